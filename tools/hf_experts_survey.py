"""Every experts class of the installed transformers that uses ``@use_experts_implementation``: does
moetile's backend take it, and does it compute what transformers' eager experts compute?

For each model family: its experts class built alone from the family's default config with tiny sizes
(E=4, k=2, H=F=256, whatever the config calls them), random weights, ``quantize_experts(experts,
"q4_K")``, then the experts call on random routing against the class's own eager forward with the
weights rounded through quantize -> dequantize (6 tokens: the mat-vec path, f32 throughout, so a few
1e-7). Refusals print moetile's error. Module level only: routers, shared experts and the rest of each
model are not exercised (tests/integrations/test_transformers.py runs whole models for five families).

    PYTHONPATH=src TRITON_INTERPRET=1 python tools/hf_experts_survey.py      # a few minutes on a CPU
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import warnings

import torch

E, K, H, F = 4, 2, 256, 256
SIZES = dict(hidden_size=H, intermediate_size=F, moe_intermediate_size=F, num_experts=E, num_local_experts=E,
             n_routed_experts=E, num_experts_per_tok=K, moe_topk=K, expert_ffn_hidden_size=F, moe_ffn_hidden_size=F,
             expert_intermediate_size=F)


def experts_classes(family: str):
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return [c for n, c in vars(mod).items() if inspect.isclass(c) and c.__module__ == mod.__name__
            and issubclass(c, torch.nn.Module) and "Experts" in n and hasattr(c, "_apply_gate")]


def rounded(ref, qtype="Q4_K"):
    """The float weights of the experts module ``ref`` := dequantize(quantize(w)), in its own layout."""
    from moetile.integrations.transformers import _float_experts
    from moetile.quant import quantize

    def rt(w):
        return quantize(w.float().contiguous(), qtype).dequantize()

    g, u, d = (rt(t) for t in _float_experts(ref))
    gu = torch.cat([g, u], 1) if ref.is_concatenated else torch.stack([g, u], 2).reshape(g.shape[0], -1, g.shape[2])
    with torch.no_grad():
        ref.gate_up_proj.copy_(gu.transpose(1, 2) if ref.is_transposed else gu)
        ref.down_proj.copy_(d.transpose(1, 2) if ref.is_transposed else d)


def check(family: str, cls) -> str:
    from transformers import AutoConfig

    from moetile.audit import row_rel_err
    from moetile.integrations.transformers import quantize_experts

    cfg = AutoConfig.for_model(family)
    sub = cfg.get_text_config()
    for k, v in SIZES.items():
        if hasattr(sub, k):
            setattr(sub, k, v)
    sub._experts_implementation = "eager"
    torch.manual_seed(0)
    e = cls(sub).eval()
    with torch.no_grad():
        for n, p in e.named_parameters():
            p.normal_(0, 0.4 if "gate_up" in n else 0.05)
    ref = copy.deepcopy(e)
    try:
        quantize_experts(e, "q4_K", progress=False)
    except ValueError as exc:
        return f"refused: {exc}"
    rounded(ref)
    g = torch.Generator().manual_seed(1)
    n_exp, hid = e._moetile.dims[:2]
    x = torch.randn(6, hid, generator=g)
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:K] for _ in range(6)])
    w = torch.rand(6, K, generator=g)
    with torch.no_grad():
        err = row_rel_err(e(x, ids, w), ref(x, ids, w)).max().item()
    gate = "plain SwiGLU" if e._moetile.clamp > 1e38 else f"clamped SwiGLU C={e._moetile.clamp:g}"
    layout = [x for x, on in (("transposed", ref.is_transposed), ("interleaved", not ref.is_concatenated)) if on]
    return f"ok: {', '.join([gate, *layout])}; max row relative error {err:.1e}"


def main():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    warnings.filterwarnings("ignore")
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    families = sorted(d for d in os.listdir(root) if os.path.exists(f"{root}/{d}/modeling_{d}.py")
                      and "@use_experts_implementation" in open(f"{root}/{d}/modeling_{d}.py").read())
    print(f"transformers {transformers.__version__}: {len(families)} families with @use_experts_implementation\n")
    print("| family | experts class | moetile |\n|---|---|---|")
    for family in families:
        for cls in experts_classes(family):
            try:
                result = check(family, cls)
            except Exception as exc:  # noqa: BLE001  (a config this survey cannot size is not moetile's verdict)
                result = f"not built here ({type(exc).__name__}: {str(exc)[:100]})"
            result = " ".join(result.replace("|", "/").split())
            print(f"| {family} | {cls.__name__} | {result} |", flush=True)


if __name__ == "__main__":
    main()
