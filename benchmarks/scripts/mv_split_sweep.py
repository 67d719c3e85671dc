"""The decode mat-vec's K split (schedule.MV_MIN_PROGRAMS: 1 = never split) on one DS4 layer step in
a CUDA graph (router, routed, shared Q8_0, combine), q2 and q4, T = 1, 2, 4.

    python3 benchmarks/scripts/mv_split_sweep.py
"""

from __future__ import annotations

import torch
import triton
from decode_graph import ds4_layer, graphed

from moetile import schedule
from moetile.benchmark import time_ms
from moetile.moe import DS4MoE


def main():
    print("graph replay, ms (median of 100)")
    for model in ("q2", "q4"):
        layer = DS4MoE(ds4_layer(model), validate=False)
        for T in (1, 2, 4):
            x = torch.randn(T, 4096, device="cuda")
            line = []
            schedule.MV_MIN_PROGRAMS = 1
            ref = layer(x)  # no split
            for target in (1, 512, 1024, 2048, 4096):
                schedule.MV_MIN_PROGRAMS = target
                g = graphed(layer, x)
                err = ((layer(x) - ref).abs().max() / ref.abs().max()).item()
                line.append(f"{target}: {time_ms(g.replay, reps=100):.4f} ({err:.0e})")
                del g
            print(f"{model} T={T}: " + " | ".join(line), flush=True)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
