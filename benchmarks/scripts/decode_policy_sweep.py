"""Decode policy on one DS4 layer step in a CUDA graph (router, routed, shared Q8_0, combine): the
mat-vec launch shape x K-split target at T = 1 and 8, then the decode/prefill switch at T = 1..16
with the best shape.

    python3 benchmarks/scripts/decode_policy_sweep.py
"""

from __future__ import annotations

import torch
import triton
from decode_graph import ds4_layer, graphed

from moetile import schedule
from moetile.benchmark import time_ms
from moetile.moe import DS4MoE

SHAPES = [(16, 128, 2), (16, 256, 2), (16, 256, 4), (16, 512, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4)]
TARGETS = (512, 2048)


def replay(layer, x) -> float:
    g = graphed(layer, x)
    ms = time_ms(g.replay, reps=100)
    del g
    return ms


def main():
    print("graph replay, ms (median of 100)")
    for model in ("q2", "q4"):
        w = ds4_layer(model)
        decode = DS4MoE(w, validate=False, path="decode")
        prefill = DS4MoE(w, validate=False, path="prefill")
        best = {}
        for T in (1, 8):
            x = torch.randn(T, 4096, device="cuda")
            line = []
            for shape in SHAPES:
                for target in TARGETS:
                    schedule._MV_SHAPE, schedule.MV_MIN_PROGRAMS = shape, target
                    try:
                        ms = replay(decode, x)
                    except Exception as e:  # noqa: BLE001
                        line.append(f"{shape}/{target}: {type(e).__name__}")
                        continue
                    best[(T, shape, target)] = ms
                    line.append(f"{shape}/{target}: {ms:.4f}")
            print(f"{model} T={T} decode: " + " | ".join(line), flush=True)
        pick = min({k[1:] for k in best}, key=lambda st: best.get((1, *st), 9) + best.get((8, *st), 9))
        schedule._MV_SHAPE, schedule.MV_MIN_PROGRAMS = pick
        print(f"{model}: best shape/target over T=1 and 8: {pick}")
        for T in (1, 2, 4, 6, 8, 12, 16):
            x = torch.randn(T, 4096, device="cuda")
            print(f"{model} T={T:2}: decode {replay(decode, x):.4f}  prefill {replay(prefill, x):.4f}", flush=True)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
