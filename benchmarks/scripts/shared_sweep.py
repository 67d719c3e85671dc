"""The shared expert (Q8_0, F_s=2048, H=4096) at prefill sizes: tile width x gate/up variant, GPU
time in a CUDA graph, against the plan the policy picks today.

    python3 benchmarks/scripts/shared_sweep.py
"""

from __future__ import annotations

import torch
import triton
from router_sweep import replay_ms

from moetile import moe, schedule
from moetile.quant import random_blocks
from moetile.quant.pack import packed


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    H, Fs = 4096, 2048
    sg, su = (packed(random_blocks("Q8_0", (Fs, H), g, "cuda")).stack() for _ in range(2))
    sd = packed(random_blocks("Q8_0", (H, Fs), g, "cuda")).stack()
    print("shared expert, ms (graph replay, median of 100)")
    for T in (8, 128, 512, 2048, 8192):
        x = torch.randn(T, H, device="cuda", generator=g)
        ids = torch.zeros((T, 1), dtype=torch.int32, device="cuda")
        w1 = torch.ones((T, 1), device="cuda")
        policy = schedule.plan_layer(T, 1, 1, "Q8_0")
        res = []
        for plan in [policy] + [schedule.LayerPlan("prefill", wd, gu) for wd in (32, 64, 128, 256)
                                for gu in ("fused", "split")]:
            def run(plan=plan, x=x, ids=ids, w1=w1):
                emap = schedule.single_expert_map(x.shape[0], "cuda")
                return moe._routed(x, sg, su, sd, ids, w1, plan, 10.0, emap=emap)
            try:
                ms = replay_ms(run)
            except Exception as e:  # noqa: BLE001
                res.append(f"{plan.width}/{plan.gate_up}: {type(e).__name__}")
                continue
            tag = "policy " if plan is policy else ""
            res.append(f"{tag}{plan.width}/{plan.gate_up}{'+wide' if plan.wide else ''}: {ms:.4f}")
        print(f"T={T}: " + " | ".join(res), flush=True)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
