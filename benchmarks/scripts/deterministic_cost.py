"""Cost of deterministic mode on the GPU, same run: the whole DS4 layer (router, routed experts,
shared expert, combine), eager, with deterministic off and on. (The router is the same in both
modes; decode sizes in a CUDA graph: decode_graph.py.)

    python3 benchmarks/scripts/deterministic_cost.py OUT_DIR
"""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import torch

from moetile.benchmark import Shape, make_weights, time_ms
from moetile.moe import moe_forward
from moetile.quant import random_blocks
from moetile.quant.pack import packed

TOKENS = (1, 8, 128, 2048, 8192)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    E, H = 256, 4096
    w = (torch.randn(E, H, device=dev, generator=g) * 0.03).half()
    pool = torch.randn(8192, H, device=dev, generator=g)
    rows = []
    print("whole layer (router, routed, shared Q8_0, combine), validate=False, ms (median)")
    shape = Shape()
    for model in ("q2", "q4"):
        wts = make_weights(model, shape, dev)
        sg = torch.Generator(device=dev).manual_seed(1)
        wts = replace(wts, router=w, bias=torch.rand(E, device=dev, generator=sg) * 0.05,
                      shared_gate=packed(random_blocks("Q8_0", (2048, H), sg, dev)),
                      shared_up=packed(random_blocks("Q8_0", (2048, H), sg, dev)),
                      shared_down=packed(random_blocks("Q8_0", (H, 2048), sg, dev)))
        for T in TOKENS:
            x = pool[:T]
            t_def = time_ms(lambda x=x, wts=wts: moe_forward(x, wts, validate=False, deterministic=False), reps=20)
            t_det = time_ms(lambda x=x, wts=wts: moe_forward(x, wts, validate=False, deterministic=True), reps=20)
            print(f"{model} T={T:5}: default {t_def:7.3f}  deterministic {t_det:7.3f}  x{t_det / t_def:.2f}")
            rows.append(dict(what="layer", variant=f"{model} default", T=T, ms=t_def))
            rows.append(dict(what="layer", variant=f"{model} deterministic", T=T, ms=t_det))
    with open(out_dir / "deterministic_cost.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["what", "variant", "T", "ms"])
        wr.writeheader()
        wr.writerows(rows)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
