"""Whole DS4 layer step (router, routed experts, shared Q8_0 expert, combine) replayed from a CUDA
graph: the decode mat-vec with float32 activations against two-level int8 ones (q8x2), and the
tiled prefill path, interleaved in two rounds (best of the two), ms. Re-measures the decode switch.
    python3 benchmarks/scripts/decode_act_ab.py
"""
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from decode_graph import ds4_layer, graphed  # noqa: E402

from moetile.benchmark import time_ms  # noqa: E402
from moetile.moe import DS4MoE  # noqa: E402

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
VARIANTS = {"decode f32": dict(path="decode", decode_act="f32"), "decode q8x2": dict(path="decode", decode_act="q8x2"),
            "prefill": dict(path="prefill"), "auto": {}}
for model in ("q2", "q4"):
    w = ds4_layer(model)
    layers = {name: DS4MoE(w, validate=False, **kw) for name, kw in VARIANTS.items()}
    print(f"{model}: graph replay ms, best of 2 rounds x median of 50  | " + " | ".join(VARIANTS))
    for T in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(T, 4096, device="cuda")
        best = {}
        for _ in range(2):
            for name, layer in layers.items():
                gr = graphed(layer, x)
                best[name] = min(best.get(name, 1e9), time_ms(gr.replay, reps=50))
                del gr
        print(f"{model} T={T:3}: " + "  ".join(f"{best[n]:.4f}" for n in VARIANTS), flush=True)
    for T in (1, 8):
        x = torch.randn(T, 4096, device="cuda")
        e = {n: time_ms(lambda la=la: la(x), reps=50) for n, la in layers.items() if n.startswith("decode")}
        print(f"{model} T={T} eager: " + "  ".join(f"{n} {v:.4f}" for n, v in e.items()), flush=True)
