"""q2/q4 decode step (T=1, 8) in a CUDA graph with and without x's quantization shared between the
routed and the shared expert (shared: the eager rule applied in the capture too), interleaved, best
of 3 rounds x median of 50, ms. python3 benchmarks/scripts/share_x_ab.py"""
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from decode_graph import ds4_layer, graphed  # noqa: E402

from moetile import moe  # noqa: E402
from moetile.benchmark import time_ms  # noqa: E402
from moetile.moe import DS4MoE  # noqa: E402

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
policy = moe._shared_act


def shared_always(x, *a):
    cap = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: False
    try:
        return policy(x, *a)
    finally:
        torch.cuda.is_current_stream_capturing = cap


for model in ("q2", "q4"):
    layer = DS4MoE(ds4_layer(model), validate=False)
    for T in (1, 8):
        x = torch.randn(T, 4096, device="cuda")
        best = {}
        for _ in range(3):
            for name, fn in (("policy", policy), ("shared in graph", shared_always)):
                moe._shared_act = fn
                gr = graphed(layer, x)
                best[name] = min(best.get(name, 1e9), time_ms(gr.replay, reps=50))
                del gr
        moe._shared_act = policy
        print(f"{model} T={T}: " + "  ".join(f"{n} {v:.4f}" for n, v in best.items()), flush=True)
