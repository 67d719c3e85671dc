"""moetile as a Hugging Face ``transformers`` experts backend, registered as ``"moetile"``.

transformers (>= 5.24) runs the forward of every experts class decorated with
``@use_experts_implementation`` (``DeepseekV4Experts``, ``Qwen3MoeExperts``, ``MixtralExperts``, ...)
through its ``ExpertsInterface`` registry, picked by ``config._experts_implementation``.
``register()`` adds moetile's forward to that registry; ``quantize_experts(model, qtype)`` or
``load_gguf_experts(model, path)`` put each experts module's weights into moetile's packed quant
blocks, free the float weights and switch the model to ``"moetile"``. transformers is imported
lazily, inside the functions (the extra ``moetile[transformers]``).

A backend receives ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` and returns
``sum_s w[t, s] * down_e(gate(gate_up_e x))`` [T, H] in the dtype of ``hidden_states``; the
router, the shared experts and everything else stay the model's. moetile's is one call of
``moe.moe_forward(x, weights, topk_ids=..., topk_weights=..., include_shared=False,
validate=False)``: no host sync (an expert id outside [0, E) gives a NaN row, not an error), the
same kernels and plans as ``DS4MoE``.

The packed planes are buffers of the experts module (f16 planes stored as int16 bits, so
``model.to(dtype)`` leaves them alone and ``model.to(device)`` moves them); they are not in the
state dict (``save_pretrained`` of a quantized model is not supported: keep the GGUF). The float
``gate_up_proj``/``down_proj`` become empty parameters, so only ``"moetile"`` can run the experts
afterwards.

Gates: the experts module's own ``_apply_gate`` decides, checked numerically once per module
(``gate_clamp``): plain SwiGLU ``silu(gate) * up`` (transformers' default gate with a SiLU
``act_fn``) or the clamped SwiGLU ``silu(min(gate, C)) * clamp(up, -C, C)`` of DeepSeek V4
(``DeepseekV4Experts._apply_gate``, C = ``config.swiglu_limit``; another class whose gate computes
exactly this with a ``limit`` or ``swiglu_limit`` attribute passes the same check). Both run as
moetile's fused epilogue, which computes the clamped form: plain SwiGLU uses C = the largest
float32, which never binds on a finite value (min(g, C) = g, clamp(u, -C, C) = u bit for bit), so
it is the same function; a pre-activation that is already +-inf comes out as +-3.4e38 instead.
Any other gate, experts with biases, without a gate projection, with a post-expert norm, or
expert-parallel are refused with an error naming the module.

Range: where the layer takes moetile's prefill kernels (more tokens than the decode limit), x and the
gated intermediate are f16 operands, so a plain-SwiGLU intermediate beyond 65504 becomes inf in that
token's output (eager bf16/f32 stays finite); DeepSeek V4's clamp bounds it. Decode keeps float32.

Inference only: no gradient flows through the experts (a warning when one was asked for).
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..benchmark import PRESETS
from ..moe import MoEWeights, moe_forward
from ..ops._checks import KSTEP
from ..quant import QTYPES, QuantTensor, canonical, quantize
from ..quant.pack import PackedTensor, pack

__all__ = [
    "BACKEND",
    "ExpertsReport",
    "LayerReport",
    "experts_forward",
    "gate_clamp",
    "load_gguf_experts",
    "quantize_experts",
    "register",
]

BACKEND = "moetile"
PLAIN_CLAMP = float(torch.finfo(torch.float32).max)  # the SwiGLU clamp that never binds: plain SwiGLU
_PARTS = ("gate", "up", "down")
_BUF = "moetile_"  # prefix of the buffers that hold the packed planes
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_FLOAT_PARAMS = ("gate_up_proj", "down_proj")


# --------------------------------------------------------------------------- registry


def _hf_moe():
    """transformers.integrations.moe, or an ImportError that says how to get it."""
    try:
        from transformers.integrations import moe as hf_moe
    except ImportError as exc:
        raise ImportError(
            "moetile.integrations.transformers needs transformers >= 5.24: pip install 'moetile[transformers]'"
        ) from exc
    if not hasattr(hf_moe, "ExpertsInterface") or not hasattr(hf_moe, "use_experts_implementation"):
        import transformers

        raise ImportError(
            f"transformers {transformers.__version__} has no experts registry (ExpertsInterface); "
            "moetile's backend needs transformers >= 5.24"
        )
    return hf_moe


def register() -> None:
    """Add ``"moetile"`` to transformers' experts registry (``ExpertsInterface.register``); idempotent.
    Afterwards ``model.set_experts_implementation("moetile")`` and
    ``from_pretrained(..., experts_implementation="moetile")`` accept it."""
    _hf_moe().ExpertsInterface.register(BACKEND, experts_forward)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"moetile"`` experts forward: [T, H] in the dtype of ``hidden_states`` (f32/bf16/f16)."""
    w = _weights(self)
    if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
        warnings.warn("moetile's experts are inference only: no gradient flows through them (nor to the router "
                      "weights); run inference under torch.no_grad() or torch.inference_mode()", stacklevel=2)
    out = moe_forward(hidden_states.contiguous(), w, topk_ids=top_k_index, topk_weights=top_k_weights,
                      include_shared=False, validate=False)
    return out.to(hidden_states.dtype)


class _State:
    """What the backend keeps beside the buffers: each part's (qtype, form, shape, planes (name,
    dtype)) and the clamp; ``cache`` is (buffers, MoEWeights) of the last call, rebuilt when the
    buffers are replaced (``model.to(device)``)."""

    def __init__(self, parts: dict, clamp: float, top_k: int, dims: tuple[int, int, int]):
        self.parts, self.clamp, self.top_k, self.dims = parts, clamp, top_k, dims
        self.names = tuple(f"{_BUF}{part}_{plane}" for part in _PARTS for plane, _ in parts[part][3])
        self.cache = None

    def __deepcopy__(self, memo):  # a copied module has its own buffers: the cache would be stale
        new = copy.copy(self)
        new.cache = None
        return new

    def __getstate__(self):
        return {**self.__dict__, "cache": None}


def _weights(m) -> MoEWeights:
    st = m.__dict__.get("_moetile")
    if st is None:
        raise RuntimeError(
            f"{type(m).__name__}: experts_implementation is {BACKEND!r} but this experts module holds no moetile "
            "weights; call moetile.integrations.transformers.quantize_experts(model) or load_gguf_experts(model, "
            "path) first"
        )
    if not _freed(m):
        raise RuntimeError(
            f"{type(m).__name__}: its float expert weights were set again after moetile quantized them, and the "
            "packed blocks would ignore them; call quantize_experts(model) again (or load_gguf_experts)")
    bufs = tuple(m._buffers.get(n) for n in st.names)
    c = st.cache
    if c is not None and all(r() is b for r, b in zip(c[0], bufs, strict=True)):
        return c[1]
    if any(b is None for b in bufs):
        raise RuntimeError(f"{type(m).__name__}: the moetile buffers {st.names} are gone from the experts module")
    it = iter(bufs)
    parts = []
    for part in _PARTS:
        qtype, form, shape, planes = st.parts[part]
        parts.append(PackedTensor(qtype, form, shape,
                                  {name: _unstore(next(it), dtype) for name, dtype in planes}))
    w = MoEWeights(*parts, top_k=st.top_k, scale=1.0, clamp=st.clamp)
    # The cache holds the buffers weakly and w only views of them: once model.to() replaces the buffers,
    # the old ones die, the callback drops the cache, and their memory is freed without another call.
    token = object()

    def drop(_ref, st=st, token=token):
        if st.cache is not None and st.cache[2] is token:
            st.cache = None

    st.cache = (tuple(weakref.ref(b, drop) for b in bufs), w, token)
    return w


def _store(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.float16 else t


def _unstore(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.view(dtype)  # always a new view: the weights built from it never hold the buffer object itself


# --------------------------------------------------------------------------- the model's experts


@dataclass
class _Site:
    name: str  # path of the experts module in the model
    module: torch.nn.Module
    block: torch.nn.Module  # its parent, the MoE block
    block_name: str
    layer: int | None  # decoder layer index (GGUF blk.L) from the path


def _is_experts(m) -> bool:
    return hasattr(type(m), "_apply_gate") and all(
        hasattr(m, a) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated", "_is_expert_parallel"))


def _sites(model: torch.nn.Module) -> list[_Site]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a transformers model or MoE block), got {type(model).__name__}")
    out = []
    for name, m in model.named_modules():
        if not _is_experts(m):
            continue
        block_name = name.rpartition(".")[0]
        block = model.get_submodule(block_name) if block_name else model
        match = _LAYER_RE.search(name)
        out.append(_Site(name or type(m).__name__, m, block, block_name or "the model",
                         int(match.group(1)) if match else None))
    if not out:
        raise ValueError(
            f"{type(model).__name__} holds no transformers experts module (a class decorated with "
            "@use_experts_implementation, e.g. DeepseekV4Experts, Qwen3MoeExperts, MixtralExperts)"
        )
    return out


@dataclass(frozen=True)
class _Plan:
    E: int
    H: int
    F: int
    clamp: float
    top_k: int


def _freed(m) -> bool:
    """True when the module's float expert weights were replaced by moetile's."""
    return "_moetile" in m.__dict__ and all(getattr(m, p).numel() == 0 for p in _FLOAT_PARAMS)


def _dims(s: _Site) -> tuple[int, int, int]:
    """(E, H, F) of the experts, from the float weights (checked against each other's layout)."""
    m = s.module
    if _freed(m):
        return m._moetile.dims
    gu, d = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(d, torch.Tensor) or gu.dim() != 3 or d.dim() != 3:
        raise ValueError(
            f"{s.name} ({type(m).__name__}): moetile needs 3-D gate_up_proj and down_proj expert stacks, got "
            f"{_shape_of(gu)} and {_shape_of(d)}"
        )
    if m.is_transposed:  # gate_up [E, H, 2F], down [E, F, H]
        E, H, F2 = gu.shape
        want = (E, F2 // 2, H)
    else:  # gate_up [E, 2F, H], down [E, H, F]
        E, F2, H = gu.shape
        want = (E, H, F2 // 2)
    if F2 % 2 or tuple(d.shape) != want:
        layout = "[E, H, 2F] and [E, F, H]" if m.is_transposed else "[E, 2F, H] and [E, H, F]"
        raise ValueError(
            f"{s.name} ({type(m).__name__}): gate_up_proj {tuple(gu.shape)} and down_proj {tuple(d.shape)} are not "
            f"expert stacks {layout}"
        )
    return E, H, F2 // 2


def _shape_of(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _plan(s: _Site) -> _Plan:
    """Check that moetile computes what the module computes; (E, H, F), the clamp and top_k."""
    m, cls = s.module, type(s.module).__name__
    refuse = {
        "_is_expert_parallel": "expert-parallel experts (transformers' EP) are not supported",
        "has_bias": "experts with bias terms (has_bias=True) are not supported: moetile's experts have none",
        "has_post_expert_norm": "a norm after each expert (has_post_expert_norm=True) is not supported",
    }
    for attr, why in refuse.items():
        if getattr(m, attr, False):
            raise ValueError(f"{s.name} ({cls}): {why}")
    if not m.has_gate:
        raise ValueError(
            f"{s.name} ({cls}): experts without a gate projection (has_gate=False: act(up x)) are not supported; "
            "moetile runs gated SwiGLU experts"
        )
    ours = set(m._moetile.names) if "_moetile" in m.__dict__ else set()
    extra = [n for n, _ in m.named_parameters(recurse=True) if n not in _FLOAT_PARAMS]
    extra += [n for n, _ in m.named_buffers(recurse=True) if n not in ours]
    if extra:
        raise ValueError(
            f"{s.name} ({cls}) holds {extra} besides gate_up_proj and down_proj; moetile would ignore them, so it "
            "refuses the module"
        )
    E, H, F = _dims(s)
    for what, n in (("hidden size H", H), ("expert FFN width F", F)):
        if n % KSTEP:
            raise ValueError(
                f"{s.name} ({cls}): {what} = {n} is not a multiple of {KSTEP}; moetile's kernels read the experts "
                f"in super-blocks of {KSTEP} weights along their inputs (H for gate and up, F for down)"
            )
    clamp = gate_clamp(m, F, where=s.name)
    k = getattr(getattr(m, "config", None), "num_experts_per_tok", None)
    top_k = k if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= E else 1
    return _Plan(E, H, F, clamp, top_k)


def gate_clamp(experts: torch.nn.Module, F: int | None = None, *, where: str | None = None) -> float:
    """The SwiGLU clamp C that ``experts._apply_gate`` computes with: its ``limit`` /
    ``swiglu_limit`` for a clamped SwiGLU (DeepSeek V4), ``PLAIN_CLAMP`` for plain SwiGLU. Found by
    evaluating the module's own gate on probe values that reach well past every candidate C and
    comparing with moetile's epilogue in float64 (relative 1e-5 per element); raises ValueError,
    naming the module, for any other gate. ``F``: the expert width (default: the module's)."""
    m, cls = experts, type(experts).__name__
    where = where or cls
    if F is None:
        F = getattr(m, "intermediate_dim", None) or 64
    limits = []
    for attr in ("limit", "swiglu_limit"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf and float(v) not in limits:
            limits.append(float(v))
    reach = 2.0 * max([*limits, 16.0]) + 8.0
    dev = next((t.device for t in [*m.parameters(), *m.buffers()] if not t.is_meta), torch.device("cpu"))
    S = 8
    g = torch.linspace(-reach, reach, S * F).double()  # float32 values, so both sides see the same inputs
    g[:8] = torch.tensor([-6e4, -1e4, -1e3, -100.0, 100.0, 1e3, 1e4, 6e4])  # a clamp under another name shows
    u = g[torch.randperm(S * F, generator=torch.Generator().manual_seed(0))]
    g, u = g.reshape(S, F), u.reshape(S, F)
    gate_up = torch.cat([g, u], 1) if m.is_concatenated else torch.stack([g, u], 2).reshape(S, 2 * F)
    try:
        with torch.no_grad():
            theirs = m._apply_gate(gate_up.to(device=dev, dtype=torch.float32)).double().cpu()
    except Exception as exc:
        raise ValueError(f"{where} ({cls}): could not evaluate its gate {cls}._apply_gate: {exc}") from exc
    found = []
    for c in [*limits, PLAIN_CLAMP]:
        gc = g.clamp(max=c)
        ours = gc * torch.sigmoid(gc) * u.clamp(-c, c)
        if theirs.shape == ours.shape:
            bad = ((theirs - ours).abs() > 1e-5 * ours.abs() + 1e-6).sum().item()
            if bad == 0:
                return c
            found.append(f"{bad} of {ours.numel()} values differ from " +
                         ("plain SwiGLU silu(g)*u" if c == PLAIN_CLAMP else f"the clamped SwiGLU with C={c:g}"))
        else:
            found.append(f"it returns shape {tuple(theirs.shape)}, not {tuple(ours.shape)}")
            break
    act = type(getattr(m, "act_fn", None)).__name__
    raise ValueError(
        f"{where} ({cls}): its gate ({cls}._apply_gate, act_fn {act}) is not one moetile implements: "
        f"{'; '.join(found)}. moetile's fused epilogue computes silu(min(g, C)) * clamp(u, -C, C) (DeepSeek V4) "
        "and plain SwiGLU silu(g) * up"
    )


def _float_experts(m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views gate [E, F, H], up [E, F, H], down [E, H, F] of the module's float weights."""
    gu, d = m.gate_up_proj.detach(), m.down_proj.detach()
    if m.is_transposed:
        gu, d = gu.transpose(1, 2), d.transpose(1, 2)
    F = gu.shape[1] // 2
    if m.is_concatenated:
        return gu[:, :F], gu[:, F:], d
    return gu[:, 0::2], gu[:, 1::2], d


def _install(s: _Site, plan: _Plan, gate, up, down, form: str) -> tuple[int, int, str]:
    """Pack gate/up/down (QuantTensor or PackedTensor) into buffers of the experts module, free its
    float weights; (float bytes freed, packed bytes held, description of the types)."""
    m = s.module
    packed = [pack(t, form) for t in (gate, up, down)]
    parts, bufs = {}, {}
    for part, p in zip(_PARTS, packed, strict=True):
        parts[part] = (p.qtype, p.form, p.shape, tuple((n, p.planes[n].dtype) for n in p.plane_order))
        for n in p.plane_order:
            bufs[f"{_BUF}{part}_{n}"] = _store(p.planes[n])
    for n in [n for n in m._buffers if n.startswith(_BUF)]:
        delattr(m, n)
    for n, b in bufs.items():
        m.register_buffer(n, b, persistent=False)
    m._moetile = _State(parts, plan.clamp, plan.top_k, (plan.E, plan.H, plan.F))
    freed = 0
    for n in _FLOAT_PARAMS:
        old = getattr(m, n)
        freed += old.numel() * old.element_size()
        setattr(m, n, torch.nn.Parameter(torch.empty(0, dtype=old.dtype, device=old.device), requires_grad=False))
    held = sum(p.nbytes for p in packed)
    g, d = packed[0], packed[2]
    return freed, held, f"{g.qtype}/{g.form} + {d.qtype}"


def _switch(model, sites: list[_Site]) -> None:
    """Run the model's experts with "moetile": through the model's own set_experts_implementation,
    and on the config of any experts module it did not reach (a bare MoE block)."""
    register()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(BACKEND)
    for s in sites:
        cfg = s.module.config
        if cfg._experts_implementation != BACKEND:
            cfg._experts_implementation = BACKEND


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class LayerReport:
    name: str  # the experts module's path in the model
    layer: int | None  # decoder layer index
    experts: str  # e.g. "IQ2_XXS/fast + Q2_K": gate/up type/form + down type
    bytes_before: int  # the float expert weights freed
    bytes_after: int  # the packed blocks held


@dataclass(frozen=True)
class ExpertsReport:
    """Expert memory of each MoE layer before and after (``str()`` gives a one-line summary)."""

    layers: tuple[LayerReport, ...]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def ratio(self) -> float:
        """bytes_before / bytes_after (how many times less memory the experts take)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else math.nan

    def __str__(self) -> str:
        kinds = sorted({r.experts for r in self.layers})
        return (f"{len(self.layers)} MoE layers, experts {', '.join(kinds)}: {self.bytes_before / 2**20:.2f} MiB -> "
                f"{self.bytes_after / 2**20:.2f} MiB ({self.ratio:.2f}x less)")


def _progress(show: bool | None):
    from rich.console import Console
    from rich.progress import Progress

    if show is None:
        show = sys.stderr.isatty() and not os.environ.get("CI")
    return Progress(console=Console(stderr=True), transient=True, disable=not show)


# --------------------------------------------------------------------------- quantize_experts


def _qtypes(spec) -> tuple[str, str]:
    """(gate/up qtype, down qtype) of a quantize_experts ``qtype`` argument."""
    if isinstance(spec, Mapping):
        if set(spec) != {"gate_up", "down"}:
            raise ValueError(f"qtype as a dict needs exactly the keys 'gate_up' and 'down', got {sorted(spec)}")
        return canonical(spec["gate_up"]), canonical(spec["down"])
    if isinstance(spec, str) and spec.strip().lower() in PRESETS:
        return PRESETS[spec.strip().lower()]
    try:
        q = canonical(spec)
    except ValueError:
        raise ValueError(
            f"unknown qtype {spec!r}: use one of {', '.join(QTYPES)} (any case), a preset "
            f"({', '.join(f'{k} = {v[0]} gate/up + {v[1]} down' for k, v in PRESETS.items())}) or "
            "{'gate_up': ..., 'down': ...}"
        ) from None
    return q, q


def _importance(importance, sites: list[_Site], plans: list[_Plan]) -> list[dict]:
    """Per site: {"gate_up": [H] or [E, H] | None, "down": [F] or [E, F] | None}."""
    out = [{} for _ in sites]
    if importance is None:
        return out
    if not isinstance(importance, Mapping):
        raise TypeError("importance must be a dict {layer index or experts module name: {'gate_up': t, 'down': t}}")
    keys = {}
    for i, s in enumerate(sites):
        keys[s.name] = i
        if s.layer is not None:
            keys.setdefault(s.layer, i)
    for key, val in importance.items():
        if key not in keys:
            raise ValueError(f"importance: {key!r} is no MoE layer of the model (layers: {sorted(map(str, keys))})")
        i = keys[key]
        if not isinstance(val, Mapping) or not set(val) <= {"gate_up", "down"}:
            raise ValueError(f"importance[{key!r}] must be a dict with keys 'gate_up' and/or 'down'")
        p = plans[i]
        for part, K in (("gate_up", p.H), ("down", p.F)):
            t = val.get(part)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) not in ((K,), (p.E, K)):
                raise ValueError(f"importance[{key!r}][{part!r}] must be a float tensor [{K}] or [{p.E}, {K}] "
                                 f"for {sites[i].name}, got {_shape_of(t)}")
            out[i][part] = t
    return out


def _quantize(x: torch.Tensor, qtype: str, imp: torch.Tensor | None) -> QuantTensor:
    x = x.float().contiguous()
    if imp is None or imp.dim() == 1:
        return quantize(x, qtype, imp)
    data = torch.stack([quantize(x[e], qtype, imp[e]).data for e in range(x.shape[0])])
    return QuantTensor(data, qtype, tuple(x.shape))


def quantize_experts(model: torch.nn.Module, qtype="q4_K", importance=None, *, form: str = "auto",
                     progress: bool | None = None) -> ExpertsReport:
    """Quantize the experts of every MoE layer of ``model`` into moetile packed blocks, free the
    float expert weights, and switch the model to the ``"moetile"`` experts backend.

    ``qtype``: one GGUF type for gate, up and down ("q4_K", "q2_K", "iq2_xxs", "q8_0", any case), a
    preset ("q2": IQ2_XXS gate/up + Q2_K down, "q4": Q4_K), or ``{"gate_up": ..., "down": ...}``.
    ``importance``: None, or ``{layer index or experts module name: {"gate_up": [H] or [E, H],
    "down": [F] or [E, F]}}`` (an imatrix's column weights; [E, K]: one per expert). ``form``: the
    IQ2_XXS packed form ("auto" = "fast"; "compact" keeps GGUF's 2.06 bits/weight, README "Packed
    forms and memory"). ``progress``: a rich progress bar (None: when stderr is a terminal).
    Quantizes on the device of the weights. Every layer is checked (gate, layout, sizes) before any
    is changed. Returns the memory report (``print(report)`` for a summary).
    """
    register()
    gq, dq = _qtypes(qtype)
    sites = _sites(model)
    for s in sites:
        if _freed(s.module):
            raise ValueError(f"{s.name}: its float expert weights were already replaced by moetile's; "
                             "quantize_experts needs the float model")
        if any(getattr(s.module, n).is_meta for n in _FLOAT_PARAMS):
            raise ValueError(f"{s.name}: the expert weights are on the meta device (nothing to quantize); load "
                             "the model's weights first, or fill the experts from a GGUF with load_gguf_experts")
    plans = [_plan(s) for s in sites]
    imps = _importance(importance, sites, plans)
    rows = []
    with _progress(progress) as bar:
        task = bar.add_task(f"quantizing experts ({gq} + {dq})", total=len(sites))
        for s, p, imp in zip(sites, plans, imps, strict=True):
            with torch.no_grad():
                g, u, d = _float_experts(s.module)
                qg, qu = _quantize(g, gq, imp.get("gate_up")), _quantize(u, gq, imp.get("gate_up"))
                qd = _quantize(d, dq, imp.get("down"))
                del g, u, d
                freed, held, kinds = _install(s, p, qg, qu, qd, form)
            rows.append(LayerReport(s.name, s.layer, kinds, freed, held))
            bar.advance(task)
    _switch(model, sites)
    return ExpertsReport(tuple(rows))


# --------------------------------------------------------------------------- load_gguf_experts


def _module_device(s: _Site, device) -> torch.device:
    from ..devices import resolve

    if device is not None:
        return resolve(device)
    m = s.module
    for t in [*(getattr(m, n) for n in _FLOAT_PARAMS), *(m._buffers[n] for n in m._buffers if n.startswith(_BUF))]:
        if t.numel() and not t.is_meta:
            return t.device
    if any(getattr(m, n).is_meta for n in _FLOAT_PARAMS):
        raise ValueError(f"{s.name}: the experts are on the meta device; pass device=")
    return torch.device("cpu")


def _file_clamp(cfg, layer: int):
    c = None if cfg is None else cfg.swiglu_clamp_exp
    if isinstance(c, list):
        return c[layer] if 0 <= layer < len(c) else None
    return c


def _router_copies(s: _Site, t, names: dict[str, str], cfg, where: str) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """(destination, source, what) for the router, its bias, the hash table and the shared expert of
    one layer; raises naming the layer and the tensor when the model and the file disagree."""
    block, bn = s.block, s.block_name
    gate = getattr(block, "gate", None)
    copies, filled = [], set()

    def put(dst_name: str, dst, src, tensor: str):
        if not isinstance(dst, torch.Tensor):
            raise ValueError(f"{where}: the file's {tensor!r} has nowhere to go: {bn} has no {dst_name}")
        if src is None:
            raise ValueError(f"{where}: {bn}.{dst_name} {tuple(dst.shape)} has no tensor {tensor!r} in the file")
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{where}: tensor {tensor!r} has shape {tuple(src.shape)} but {bn}.{dst_name} "
                             f"is {tuple(dst.shape)}")
        if dst.is_meta:
            raise ValueError(f"{where}: {bn}.{dst_name} is on the meta device; materialize the model first")
        if dst.is_floating_point() != src.is_floating_point():
            raise ValueError(f"{where}: tensor {tensor!r} is {src.dtype} but {bn}.{dst_name} is {dst.dtype}")
        copies.append((dst, src, tensor))
        filled.add(dst_name)

    put("gate.weight", getattr(gate, "weight", None), t.router, names["router"])
    for attr, field in (("e_score_correction_bias", "bias"), ("tid2eid", "tid2eid")):
        dst, src = getattr(gate, attr, None), getattr(t, field)
        if dst is not None or src is not None:
            put(f"gate.{attr}", dst, src, names[field])
    shared_attr = next((a for a in ("shared_experts", "shared_expert") if getattr(block, a, None) is not None), None)
    if shared_attr is not None or t.shared_gate is not None:
        sh = getattr(block, shared_attr) if shared_attr else None
        for proj, field in (("gate_proj", "shared_gate"), ("up_proj", "shared_up"), ("down_proj", "shared_down")):
            lin = getattr(sh, proj, None)
            if getattr(lin, "bias", None) is not None:
                raise ValueError(f"{where}: {bn}.{shared_attr}.{proj} has a bias; the file's shared expert has none")
            q = getattr(t, field)
            put(f"{shared_attr or 'shared_experts'}.{proj}.weight", getattr(lin, "weight", None),
                None if q is None else q.dequantize(), names[field])
    left = [n for n, _ in [*block.named_parameters(), *block.named_buffers()]
            if not n.startswith("experts.") and n not in filled and _persistent(block, n)]
    if left:
        raise ValueError(
            f"{where}: {bn} has {left}, which the GGUF's MoE tensors do not fill (moetile loads the router, its bias, "
            "the hash table and a gate/up/down shared expert); load with include_router=False"
        )
    return copies


def _router_checks(s: _Site, cfg, where: str) -> None:
    """The file's top-k and route scale against the model's router (with or without include_router:
    experts loaded under another router's k or scale would be silently wrong)."""
    gate = getattr(s.block, "gate", None)
    checks = [("expert_used_count", getattr(gate, "top_k", None)),
              ("expert_weights_scale", getattr(gate, "routed_scaling_factor", None))]
    for key, have in checks:
        want = getattr(cfg, key, None) if cfg is not None else None
        if want is not None and have is not None and not math.isclose(float(want), float(have), rel_tol=1e-6):
            raise ValueError(f"{where}: the file's {cfg.arch}.{key} = {want} but the model's router uses {have}")


def _persistent(block: torch.nn.Module, name: str) -> bool:
    mod_name, _, leaf = name.rpartition(".")
    mod = block.get_submodule(mod_name) if mod_name else block
    return leaf not in mod._buffers or leaf not in mod._non_persistent_buffers_set


def load_gguf_experts(model: torch.nn.Module, path, include_router: bool = False, *, form: str = "auto",
                      device=None, progress: bool | None = None) -> ExpertsReport:
    """Fill the experts of every MoE layer of ``model`` from a llama.cpp / ds4 GGUF
    (``blk.L.ffn_{gate,up,down}_exps.weight``; L = the decoder layer index in the module path), kept
    in their quant blocks (packed, never dequantized), and switch the model to ``"moetile"``.

    ``include_router=True`` also copies, into the model's own modules, the router
    (``ffn_gate_inp`` -> ``gate.weight``), its bias (``exp_probs_b`` ->
    ``gate.e_score_correction_bias``), the hash table (``ffn_gate_tid2eid`` -> ``gate.tid2eid``) and
    the shared expert (``ffn_{gate,up,down}_shexp``, dequantized into ``shared_experts``' Linear
    weights). ``device``: where the experts go (default: where the module's weights are). The file's
    MoE layers must be exactly the model's; every layer is checked (types, shapes against the module,
    the file's ``swiglu_clamp_exp`` against the module's gate, ``expert_used_count`` /
    ``expert_weights_scale`` against the router, with or without ``include_router``: a model config
    that disagrees with the file is more often a mistake than a choice; to run the experts under
    another k, change the router's after loading) before anything changes, and a mismatch raises
    naming the layer and the tensor. Returns the memory report.
    """
    from ..gguf_io import GGUFFile, layer_tensor_names, open_gguf

    register()
    f = path if isinstance(path, GGUFFile) else open_gguf(path)
    sites = _sites(model)
    for s in sites:
        if s.layer is None:
            raise ValueError(f"{s.name}: no 'layers.N' in its module path, so no GGUF block blk.N to load it from")
    seen = {}
    for s in sites:
        if s.layer in seen:
            raise ValueError(f"{seen[s.layer]} and {s.name} both map to GGUF block blk.{s.layer}; load_gguf_experts "
                             "needs one experts module per decoder layer")
        seen[s.layer] = s.name
    in_file = set(f.layers())
    in_model = {s.layer for s in sites}
    if in_model - in_file or in_file - in_model:
        missing, extra = sorted(in_model - in_file), sorted(in_file - in_model)
        msg = f"{f.path}: the file has {len(in_file)} MoE layers, the model {len(in_model)}"
        if missing:
            s = next(s for s in sites if s.layer == missing[0])
            msg += (f"; the model's layer {missing[0]} ({s.name}) has no tensor "
                    f"{layer_tensor_names(missing[0])['gate']!r} in the file (missing: {missing})")
        if extra:
            msg += f"; the file's MoE layers {extra} are not in the model"
        raise ValueError(msg)
    cfg = f.moe_config() if isinstance(f.arch, str) else None
    work = []
    for s in sites:
        p = _plan(s)
        names = layer_tensor_names(s.layer)
        where = f"{f.path} layer {s.layer}"
        t = f.moe_layer(s.layer)
        for part, qt, want in (("gate", t.gate, (p.E, p.F, p.H)), ("up", t.up, (p.E, p.F, p.H)),
                               ("down", t.down, (p.E, p.H, p.F))):
            if qt.shape != want:
                raise ValueError(f"{where}: tensor {names[part]!r} is {qt.qtype} {qt.shape} but {s.name} needs "
                                 f"{want} (E={p.E}, H={p.H}, F={p.F})")
        c = _file_clamp(cfg, s.layer)
        if c is not None and (p.clamp == PLAIN_CLAMP or not math.isclose(c, p.clamp, rel_tol=1e-6)):
            gate = "plain SwiGLU" if p.clamp == PLAIN_CLAMP else f"clamped SwiGLU with C = {p.clamp:g}"
            raise ValueError(f"{where}: the file's {cfg.arch}.swiglu_clamp_exp = {c:g} but {s.name}'s gate is {gate}")
        _router_checks(s, cfg, where)
        copies = _router_copies(s, t, names, cfg, where) if include_router else []
        work.append((s, p, t, copies, _module_device(s, device)))
    rows = []
    with _progress(progress) as bar:
        task = bar.add_task(f"loading experts from {f.path.name}", total=len(work))
        for s, p, t, copies, dev in work:
            with torch.no_grad():
                freed, held, kinds = _install(s, p, t.gate.to(dev), t.up.to(dev), t.down.to(dev), form)
                for dst, src, _ in copies:
                    dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
            rows.append(LayerReport(s.name, s.layer, kinds, freed, held))
            bar.advance(task)
    _switch(model, sites)
    return ExpertsReport(tuple(rows))
