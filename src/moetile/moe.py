"""The DS4 Flash routed-MoE layer: router, grouped gate+up+SwiGLU, down, deterministic slot
sum, shared expert; functional ``moe_forward`` and the ``DS4MoE`` module.

Letters: T tokens, H hidden, F expert FFN width, E experts, k experts per token, P = T*k.
Math and order of operations: ../shared/ds4-moe-reference.md §2-3.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, replace

import torch

from . import custom_ops, schedule
from .devices import refuse_meta, resolve
from .ops._checks import check_clamp, ids_int32
from .ops._launch import use_kernel
from .ops.act_quant import act_layout, quantize_act
from .ops.elementwise import combine_slots, swiglu_weight
from .ops.mul_mm_id import mul_mm_id_mapped
from .ops.mul_mv_id import launch_mv
from .ops.router import route
from .quant import QuantTensor
from .quant.pack import PackedTensor, packed
from .routing import check_scale

Quantized = QuantTensor | PackedTensor

DS4 = dict(top_k=6, scale=1.5, clamp=10.0)  # when a GGUF lacks expert_used_count / _weights_scale / swiglu_clamp_exp
# Test-only override: fill every buffer the layer allocates (output and intermediates) with NaN
# first, so a row that no kernel writes shows up as NaN in the output instead of stale memory.
POISON = False


def _buffer(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_QUANT = ("gate", "up", "down", "shared_gate", "shared_up", "shared_down")
_TENSORS = (*_QUANT, "router", "bias", "hash_table")


@dataclass(frozen=True)
class MoEWeights:
    """One layer's tensors. gate/up (E, F, H) and down (E, H, F) quantized (PackedTensor, or
    QuantTensor packed on first use); router [E, H] f16/f32 (None when ids are always given); bias
    [E] f32; hash_table [V, k] int32 (hash layers); shared_* Q8_0 (F_s, H) / (H, F_s) or None;
    top_k experts per token, route weight ``scale``, SwiGLU ``clamp`` C (> 0) of every expert."""

    gate: Quantized
    up: Quantized
    down: Quantized
    router: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    hash_table: torch.Tensor | None = None
    shared_gate: Quantized | None = None
    shared_up: Quantized | None = None
    shared_down: Quantized | None = None
    top_k: int = 6
    scale: float = 1.5
    clamp: float = 10.0

    def __post_init__(self):
        for name in ("gate", "up", "down"):
            t = getattr(self, name)
            if not isinstance(t, (QuantTensor, PackedTensor)) or len(t.shape) != 3:
                raise TypeError(f"{name} must be an (E, N, K) PackedTensor or QuantTensor, got {t!r}")
        _same_kind("gate", self.gate, "up", self.up)
        E, F, H = self.gate.shape
        if self.up.shape != (E, F, H) or self.down.shape != (E, H, F):
            raise ValueError(
                f"expert shapes disagree: gate {self.gate.shape}, up {self.up.shape} must be (E, F, H) and "
                f"down {self.down.shape} must be (E, H, F)"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= E:
            raise ValueError(f"top_k must be an int in [1, {E}], got {self.top_k!r}")
        object.__setattr__(self, "clamp", check_clamp(self.clamp))
        check_scale(self.scale)
        for f in ("router", "bias", "hash_table"):
            t = getattr(self, f)
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{f} must be a tensor or None, got {type(t).__name__}")
        if self.router is not None and tuple(self.router.shape) != (E, H):
            raise ValueError(f"router must be [E, H] = ({E}, {H}), got {tuple(self.router.shape)}")
        shared = (self.shared_gate, self.shared_up, self.shared_down)
        if any(s is not None for s in shared):
            if any(s is None for s in shared):
                raise ValueError("shared expert needs all of shared_gate, shared_up, shared_down")
            for name in ("shared_gate", "shared_up", "shared_down"):
                t = getattr(self, name)
                if not isinstance(t, (QuantTensor, PackedTensor)) or len(t.shape) != 2:
                    raise TypeError(f"{name} must be an (N, K) PackedTensor or QuantTensor, got {type(t).__name__}")
            _same_kind("shared_gate", self.shared_gate, "shared_up", self.shared_up)
            Fs = self.shared_gate.shape[0]
            if (self.shared_gate.shape != (Fs, H) or self.shared_up.shape != (Fs, H)
                    or self.shared_down.shape != (H, Fs)):
                raise ValueError(
                    f"shared expert shapes: gate {self.shared_gate.shape}, up {self.shared_up.shape} must be "
                    f"(F_s, {H}); down {self.shared_down.shape} must be ({H}, F_s)"
                )
        where = {f: getattr(self, f).device for f in _TENSORS if getattr(self, f) is not None}
        if len(set(where.values())) != 1:  # a kernel handed a pointer of another device faults or reads garbage
            raise ValueError(f"the layer's tensors must be on one device, got {where}")
        for f in ("router", "bias", "hash_table"):
            refuse_meta(f, getattr(self, f))

    @property
    def dims(self) -> tuple[int, int, int]:
        """(E, H, F)."""
        E, F, H = self.gate.shape
        return E, H, F

    @property
    def has_shared(self) -> bool:
        return self.shared_gate is not None

    def to(self, device) -> MoEWeights:
        device = resolve(device)
        return replace(self, **{f: getattr(self, f).to(device) for f in _TENSORS if getattr(self, f) is not None})

    def packed(self, form: str = "auto") -> MoEWeights:
        """The same layer with every quantized tensor in its packed form (``form`` picks the
        IQ2_XXS form: "auto", "fast" or "compact"); already packed tensors are kept."""
        if form == "auto" and all(isinstance(getattr(self, f), (PackedTensor, type(None))) for f in _QUANT):
            return self
        return replace(self, **{f: packed(getattr(self, f), form) for f in _QUANT if getattr(self, f) is not None})


def _same_kind(a: str, ta, b: str, tb) -> None:
    """gate and up are read by one kernel with one decoder: same quant type, and same packed form
    where both are packed (a QuantTensor takes the form of the layer's pack)."""
    if ta.qtype != tb.qtype:
        raise ValueError(f"{a} ({ta.qtype}) and {b} ({tb.qtype}) must have the same quant type")
    fa, fb = getattr(ta, "form", None), getattr(tb, "form", None)
    if fa is not None and fb is not None and fa != fb:
        raise ValueError(f"{a} (form {fa!r}) and {b} (form {fb!r}) must be packed in the same form")


def ds4_hyper(cfg, layer: int | str, where: str) -> dict:
    """top_k, scale and clamp of ``layer`` from a GGUF's MoEConfig (DS4 defaults where a key is
    absent); raises GGUFError for values moetile cannot honour rather than computing without them."""
    from .gguf_io import GGUFError

    a = cfg.arch
    if cfg.expert_group_count > 1:
        raise GGUFError(
            f"{where}: {a}.expert_group_count = {cfg.expert_group_count}: group-limited routing is not "
            "implemented (moetile routes over all experts)"
        )
    if cfg.expert_weights_norm is False:
        raise GGUFError(f"{where}: {a}.expert_weights_norm = false: routing without weight normalisation "
                        "is not implemented")
    top_k = DS4["top_k"] if cfg.expert_used_count is None else cfg.expert_used_count
    E = cfg.expert_count
    if top_k < 1 or (E is not None and top_k > E):
        raise GGUFError(f"{where}: {a}.expert_used_count = {top_k} must be in [1, {a}.expert_count = {E}]")
    scale = DS4["scale"] if cfg.expert_weights_scale is None else cfg.expert_weights_scale
    if not math.isfinite(scale):
        raise GGUFError(f"{where}: {a}.expert_weights_scale = {scale} is not finite")
    clamp = cfg.swiglu_clamp_exp
    if clamp is None:
        clamp = DS4["clamp"]
    elif isinstance(clamp, list):
        if not isinstance(layer, str) and 0 <= int(layer) < len(clamp):
            clamp = clamp[int(layer)]
        elif isinstance(layer, str) and len(set(clamp)) == 1:  # e.g. "mtp.0": no index, one value
            clamp = clamp[0]
        else:
            raise GGUFError(f"{where}: {a}.swiglu_clamp_exp holds {len(clamp)} per-layer values; none is "
                            f"layer {layer!r}'s")
    if not 0 < clamp < math.inf:
        raise GGUFError(f"{where}: {a}.swiglu_clamp_exp = {clamp} for this layer; moetile needs a finite "
                        "clamp > 0")
    return dict(top_k=top_k, scale=float(scale), clamp=float(clamp))


def moe_forward(
    x: torch.Tensor,
    weights: MoEWeights,
    token_ids: torch.Tensor | None = None,
    *,
    topk_ids: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    include_shared: bool = True,
    tile="auto",
    path: str = "auto",
    gate_up: str = "auto",
    validate: bool = True,
    deterministic: bool | None = None,
    stage_hook=None,
    decode_act: str = "auto",
) -> torch.Tensor:
    """ffn_out f32 [T, H] = sum_s route_w[t,s] * down_e(SwiGLU(gate_e x, up_e x)) + shared(x).

    x: [T, H] f32/bf16/f16 (the ffn_norm output). token_ids: [T] (hash layers only).
    topk_ids int [T, k] and topk_weights f32 [T, k] bypass the router (other MoE models).
    tile/path/gate_up override schedule.plan_layer (A/B); so does ``decode_act``, the decode mat-vec's
    activations: "q8x2" (two-level int8, integer products; row error ~3e-5) or "f32" (exact float32,
    ~1e-7). ``deterministic`` (None: env
    ``MOETILE_DETERMINISTIC``): a token's output is the same bits whatever else is in the batch and
    in whatever order (one plan for every T; slower for small and large T, BENCHMARKS.md §9; the
    router kernels are batch-invariant in both modes). ``stage_hook(name)``, if given, is
    called after each stage (route, map, gate_up, down, shared, combine): the profiler records
    CUDA events there. NaN/Inf in a token's x reach only that
    token's output (and, via the router, its expert choice), never other tokens.
    """
    with on_device(x):  # Triton launches on the current device: make it x's
        return _moe_forward(x, weights, token_ids, topk_ids, topk_weights, include_shared, tile, path, gate_up,
                            validate, deterministic, stage_hook, decode_act)


def on_device(x):
    """A context making x's GPU the current device (the kernels launch there), or nothing for CPU x."""
    return torch.cuda.device(x.device) if isinstance(x, torch.Tensor) and x.is_cuda else contextlib.nullcontext()


def _moe_forward(x, weights, token_ids, topk_ids, topk_weights, include_shared, tile, path, gate_up, validate,
                 deterministic, stage_hook, decode_act) -> torch.Tensor:
    E, H, F = weights.dims
    _check_x(x, H, weights.gate.device)
    T = x.shape[0]
    det = schedule.resolve_deterministic(deterministic)
    schedule.check_overrides(tile, path, gate_up, decode_act)  # on every path, T = 0 and CPU included
    schedule.tile_max_from_env()  # a bad MOETILE_TILE_MAX too
    plan_kw = dict(tile=tile, path=path, gate_up=gate_up, deterministic=det, decode_act=decode_act)
    shared, side, qx = None, None, None
    if include_shared and weights.has_shared and T and x.is_cuda and stage_hook is None:
        side = _side_stream(x.device)  # made in the eager warm-up call, before any capture
        if schedule.SHARED_ON_SIDE_STREAM and torch.cuda.is_current_stream_capturing():
            shared = _shared_on_side_stream(x, weights.packed(), plan_kw, side)
        else:
            side = None
    try:
        if topk_ids is None:
            if weights.router is None:
                raise ValueError("no router weights: pass topk_ids and topk_weights")
            topk_ids, topk_weights = route(
                x, weights.router, bias=weights.bias, token_ids=token_ids, hash_table=weights.hash_table,
                k=weights.top_k, scale=weights.scale, validate=validate, deterministic=det,
            )
        else:
            topk_ids, topk_weights = _check_ids(topk_ids, topk_weights, T, E, validate, x.device)
        hook = stage_hook or (lambda name: None)
        hook("route")
        k = topk_ids.shape[1]
        out = _buffer((T, H), torch.float32, x.device)
        if T == 0:
            return out
        if not use_kernel(x.device, "moe_forward"):
            from .reference import ds4_moe_ref

            # deterministic: token by token, so that no BLAS call's shape depends on the batch
            rows = [slice(t, t + 1) for t in range(T)] if det else [slice(0, T)]
            for r in rows:
                out[r] = ds4_moe_ref(x[r], weights, topk_ids=topk_ids[r], topk_weights=topk_weights[r],
                                     include_shared=include_shared, round_f16=True)
            return out
        weights = weights.packed()  # a no-op for packed weights; QuantTensors pack once (cached)
        plan = schedule.plan_layer(T, k, E, schedule.form_key(weights.gate), **plan_kw)
        qx = _shared_act(x, weights, plan, include_shared, plan_kw)
        y = _routed(x, weights.gate, weights.up, weights.down, topk_ids, topk_weights, plan, weights.clamp, hook,
                    act_x=qx)
    finally:
        if side is not None:  # joined on every exit: a capture must not end with the fork open
            torch.cuda.current_stream(x.device).wait_stream(side)
    if side is None and include_shared and weights.has_shared:
        shared = _shared(x, weights, plan_kw, act_x=qx)
        hook("shared")
    combine_slots(y, out, shared)
    hook("combine")
    return out


def _shared_act(x, weights: MoEWeights, routed: schedule.LayerPlan, include_shared: bool, plan_kw: dict):
    """x quantized once for both the routed and the shared expert's mat-vec when both plan the
    q8x2 decode path in the same activation layout (q2: IQ2_XXS and Q8_0), else None: in eager calls
    only (one launch fewer). ``weights``: packed; ``routed``: the routed experts' plan. In a graph
    capture the shared expert runs on a side stream, and quantizing before the fork let it start
    ahead of the router and slow it (q2 T=1 step: 81.5 -> 94.1 us of GPU span on the H100,
    BENCHMARKS.md §12), so each stream quantizes its own there."""
    if not (include_shared and weights.has_shared):
        return None
    if x.is_cuda and schedule.SHARED_ON_SIDE_STREAM and torch.cuda.is_current_stream_capturing():
        return None
    shared = schedule.plan_layer(x.shape[0], 1, 1, schedule.form_key(weights.shared_gate), **plan_kw)
    if not all(p.path == "decode" and p.mv_act == "q8x2" for p in (routed, shared)):
        return None
    layout = act_layout(weights.gate)
    return quantize_act(x, layout) if act_layout(weights.shared_gate) == layout else None


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    side = _SIDE_STREAMS.get(dev.index)
    if side is None:
        side = _SIDE_STREAMS[dev.index] = torch.cuda.Stream(dev)
    return side


def _shared_on_side_stream(x, weights: MoEWeights, plan_kw: dict, side: torch.cuda.Stream) -> torch.Tensor:
    """Start the shared expert of x on the stream ``side`` of x's GPU (it needs nothing but x, so it
    runs beside the router and the routed experts); its f32 [T, H] output, which the caller's stream
    must wait for (``wait_stream(side)``) before reading it. The output is allocated on the
    caller's stream, so its memory follows that stream's order; the shared expert's own buffers live
    and die on the side stream. Capturable in a CUDA graph (a fork and a join)."""
    dev = x.device
    main = torch.cuda.current_stream(dev)
    out = _buffer((x.shape[0], weights.dims[1]), torch.float32, dev)
    side.wait_stream(main)
    with torch.cuda.device(dev), torch.cuda.stream(side):
        _shared(x, weights, plan_kw, out=out)
    return out


def _shared(x, weights: MoEWeights, plan_kw: dict, out: torch.Tensor | None = None, act_x=None) -> torch.Tensor:
    """f32 [T, H] (in ``out`` if given): the shared expert of every token (weight 1), on the
    kernels; ``plan_kw`` are plan_layer's overrides; ``act_x``: x already quantized (_shared_act)."""
    T = x.shape[0]
    ones_ids, ones_w = _expert0_weight1(T, x.device)
    sg, su, sd = (t.stack() for t in (weights.shared_gate, weights.shared_up, weights.shared_down))
    splan = schedule.plan_layer(T, 1, 1, schedule.form_key(sg), **plan_kw)
    emap = schedule.single_expert_map(T, x.device) if splan.path == "prefill" else None
    return _routed(x, sg, su, sd, ones_ids, ones_w, splan, weights.clamp, emap=emap, out=out,
                   act_x=act_x).view(T, -1)


_EXPERT0: dict = {}  # device -> [(zeros int32 [n, 1], ones f32 [n, 1]), ...], every size made, largest last


def _expert0_weight1(T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 [T, 1] all 0, weights f32 [T, 1] all 1) of the shared expert, views of buffers
    made once per device (a decode step is host-bound: two launches fewer). Never written to, and
    never freed: a CUDA graph captured with a view reads its memory at every replay, so a larger
    buffer for a longer batch joins the list instead of replacing the smaller one."""
    made = _EXPERT0.setdefault(device, [])
    if made and made[-1][0].shape[0] >= T:
        ids, w = made[-1]
        return ids[:T], w[:T]
    n = max(T, 2 * made[-1][0].shape[0] if made else 64)
    ids = torch.zeros((n, 1), dtype=torch.int32, device=device)
    w = torch.ones((n, 1), dtype=torch.float32, device=device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():  # else the capture's own
        made.append((ids, w))
    return ids[:T], w[:T]


def _routed(x, gate, up, down, ids, route_w, plan: schedule.LayerPlan, clamp: float, hook=None,
            emap: schedule.ExpertMap | None = None, out: torch.Tensor | None = None, act_x=None) -> torch.Tensor:
    """y_slots f32 [T, k, H]: route_w * down(SwiGLU_C(gate x, up x)) per (token, slot), C = ``clamp``;
    ``emap``: the expert map of ``ids`` when the caller has it without a sort (prefill); ``out``: a
    contiguous f32 buffer of T*k*H elements to write into; ``act_x``: x quantized in gate's layout
    (q8x2 decode plans; quantized here if None)."""
    T, k = ids.shape
    E, F, H = gate.shape
    P = T * k
    hook = hook or (lambda name: None)
    rw = route_w.reshape(P).to(torch.float32).contiguous()
    y = _buffer((T, k, H), torch.float32, x.device) if out is None else out.view(T, k, H)
    if plan.path == "decode":
        mid = _buffer((P, F), torch.float32, x.device)
        ids32 = ids_int32(ids, E)
        q = plan.mv_act == "q8x2"
        act = (act_x if act_x is not None else quantize_act(x, act_layout(gate))) if q else None
        launch_mv(x, gate, ids32, k, mid, w_up=up, route_weights=rw, clamp=clamp, split=plan.mv_split, act=act)
        hook("gate_up")
        act = quantize_act(mid, act_layout(down)) if q else None
        launch_mv(mid.view(T, k, F), down, ids32, k, y.view(P, H), split=plan.mv_split, act=act)
        hook("down")
        return y
    emap = emap if emap is not None else schedule.build_expert_map(ids, E)
    lists = plan.tile_lists(emap)  # each width class writes the rows of its own experts
    hook("map")
    xh = x.to(torch.float16).contiguous()
    mid = _buffer((P, F), torch.float16, x.device)
    split = [tiles for tiles, gu in lists if gu == "split"]
    for tiles, gu in lists:
        if gu == "fused":
            mul_mm_id_mapped(xh, gate, emap, tiles, out=mid, w_up=up, route_weights=rw, clamp=clamp)
    if split:
        g = _buffer((P, F), torch.float32, x.device)
        u = _buffer((P, F), torch.float32, x.device)
        for tiles in split:
            mul_mm_id_mapped(xh, gate, emap, tiles, out=g)
            mul_mm_id_mapped(xh, up, emap, tiles, out=u)
        # with a fused narrow class, only the wide class's rows are in g/u: keep the others' mid
        wide = None if len(split) == len(lists) else (ids, emap.counts, plan.wide_rows)
        swiglu_weight(g, u, rw, mid, wide=wide, clamp=clamp)
    hook("gate_up")
    for tiles, _ in lists:
        mul_mm_id_mapped(mid.view(T, k, F), down, emap, tiles, out=y.view(P, H))
    hook("down")
    return y


def _check_x(x, H, device):
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 2 or x.shape[1] != H:
        raise ValueError(f"x must be [T, H] with H = {H}, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the expert weights are on {device}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")


def _check_ids(ids, w, T, E, validate, device):
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
        raise TypeError(f"topk_ids must be an int32/int64 [T, k] tensor, got {getattr(ids, 'dtype', type(ids))}")
    if ids.shape[0] != T:
        raise ValueError(f"topk_ids has {ids.shape[0]} rows but x has {T} tokens")
    if T and ids.shape[1] == 0:
        raise ValueError("topk_ids has k = 0 experts per token")
    if w is None or not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(ids.shape):
        raise ValueError(f"topk_weights must be a float tensor of shape {tuple(ids.shape)} when topk_ids is given")
    if not w.is_floating_point():
        raise TypeError(f"topk_weights must be a float tensor, got {w.dtype}")
    if ids.device != device or w.device != device:  # a kernel handed another device's pointer faults
        raise ValueError(f"topk_ids ({ids.device}) and topk_weights ({w.device}) must be on x's device, {device}")
    if validate and ids.numel() and bool(((ids < 0) | (ids >= E)).any()):
        raise ValueError(f"topk_ids holds expert ids outside [0, {E})")
    return ids_int32(ids, E).view(ids.shape), w.to(torch.float32).contiguous()  # 2**32 + e must not wrap to e


class DS4MoE(torch.nn.Module):
    """The DS4 Flash routed-MoE layer (plus shared expert) on GGUF-quantized weights.

    ``forward(x [T, H], token_ids [T] | None) -> f32 [T, H]``. Build with ``from_gguf(path, L)``
    or from quantized tensors (``DS4MoE(MoEWeights(...))``); the experts are packed once, here
    (``form`` picks the IQ2_XXS form: "auto", "fast" or "compact"). ``deterministic`` (None: env
    ``MOETILE_DETERMINISTIC``) makes each token's output independent of the batch (moe_forward).
    ``validate=False`` skips the value checks that sync with the host (expert and token id ranges),
    so that a forward can be captured in a CUDA graph. Plan overrides (tile, path, gate_up,
    decode_act) are attributes for A/B runs.
    """

    def __init__(self, weights: MoEWeights, *, form: str = "auto", tile="auto", path: str = "auto",
                 gate_up: str = "auto", deterministic: bool | None = None, validate: bool = True,
                 decode_act: str = "auto"):
        super().__init__()
        self._register()
        self.weights = weights.packed(form)
        schedule.check_overrides(tile, path, gate_up, decode_act)  # a typo fails here, not at the first forward
        self.tile, self.path, self.gate_up, self.decode_act = tile, path, gate_up, decode_act
        self.deterministic = schedule.resolve_deterministic(deterministic)
        self.validate = validate

    @classmethod
    def from_gguf(cls, file, layer: int, device=None, group=None, **kw) -> DS4MoE:
        """Layer ``layer`` of the GGUF ``file`` (memory-mapped, not dequantized), packed on
        ``device``; ``kw``: ``form`` and the plan overrides (tile, path, gate_up). top_k, scale and
        the SwiGLU clamp come from the file's metadata (``ds4_hyper``). With a torch.distributed
        ``group``: this rank's part of the layer, an expert-parallel ``distributed.EPMoE`` that
        loads only its own experts."""
        if group is not None:
            from .distributed import EPMoE

            return EPMoE.from_gguf(file, layer, device=device, group=group, **kw)
        from .gguf_io import open_gguf

        device = resolve(device)  # before any I/O: "CUDA requested but not available" comes first
        f = open_gguf(file)
        hyper = ds4_hyper(f.moe_config(), layer, f"{f.path} layer {layer}")
        t = f.moe_layer(layer, device=device)
        w = MoEWeights(
            t.gate, t.up, t.down, t.router, t.bias, t.tid2eid, t.shared_gate, t.shared_up, t.shared_down, **hyper
        )
        return cls(w, **kw)

    def _register(self) -> None:
        """A handle of its own: the layer's name inside a compiled graph (custom_ops.py)."""
        self._handle = custom_ops.register(getattr(self, "_weights", None))
        weakref.finalize(self, custom_ops.unregister, self._handle)

    def __setstate__(self, state) -> None:  # a copy or an unpickled layer must not share the handle
        super().__setstate__(state)
        self._register()

    @property
    def weights(self) -> MoEWeights:
        return self._weights

    @weights.setter
    def weights(self, weights: MoEWeights) -> None:
        self._weights = weights
        custom_ops.update(self._handle, weights)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op for torch.compile (custom_ops.py)
            return torch.ops.moetile.ds4_moe(x, token_ids, self._handle, str(self.tile), self.path, self.gate_up,
                                             self.deterministic, self.validate, self.decode_act)
        return moe_forward(x, self.weights, token_ids, tile=self.tile, path=self.path, gate_up=self.gate_up,
                           deterministic=self.deterministic, validate=self.validate, decode_act=self.decode_act)

    def extra_repr(self) -> str:
        E, H, F = self.weights.dims
        g = self.weights.gate
        return (f"E={E}, k={self.weights.top_k}, H={H}, F={F}, experts={g.qtype}/{g.form} + "
                f"{self.weights.down.qtype}, shared={self.weights.has_shared}, "
                f"hash={self.weights.hash_table is not None}, deterministic={self.deterministic}")
