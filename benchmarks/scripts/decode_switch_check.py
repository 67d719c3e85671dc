"""The decode/prefill switch as the policy takes it, against both paths forced, on one DS4 layer
step in a CUDA graph (router, routed, shared Q8_0, combine), T = 1..16.

    python3 benchmarks/scripts/decode_switch_check.py
"""

from __future__ import annotations

import torch
import triton
from decode_graph import ds4_layer
from decode_policy_sweep import replay

from moetile.moe import DS4MoE


def main():
    print("graph replay, ms (median of 100): auto policy | decode forced | prefill forced")
    for model in ("q2", "q4"):
        w = ds4_layer(model)
        layers = {p: DS4MoE(w, validate=False, path=p) for p in ("auto", "decode", "prefill")}
        for T in (1, 2, 4, 6, 8, 10, 12, 16):
            x = torch.randn(T, 4096, device="cuda")
            t = {p: replay(m, x) for p, m in layers.items()}
            print(f"{model} T={T:2}: auto {t['auto']:.4f} | decode {t['decode']:.4f} | prefill {t['prefill']:.4f}",
                  flush=True)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
