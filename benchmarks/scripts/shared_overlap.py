"""The shared expert on a second stream (schedule.SHARED_ON_SIDE_STREAM) against one stream, same run:
one whole DS4 layer (router, routed experts, shared Q8_0 expert, combine), CUDA-graph replay at
every T (graphs capture both streams), q2 and q4.

    python3 benchmarks/scripts/shared_overlap.py OUT_DIR
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
import triton
from decode_graph import ds4_layer, graphed

from moetile import schedule
from moetile.benchmark import time_ms
from moetile.moe import DS4MoE


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print("whole DS4 layer, CUDA graph replay, ms (median of 50); one stream / shared expert on a second stream")
    for model in ("q2", "q4"):
        layer = DS4MoE(ds4_layer(model), validate=False)
        for T in (1, 2, 4, 8, 16, 128, 2048, 8192):
            x = torch.randn(T, 4096, device="cuda")
            ms = {}
            for side in (False, True, False, True):  # interleaved: drift shows as a difference between repeats
                schedule.SHARED_ON_SIDE_STREAM = side
                graph = graphed(layer, x)
                ms.setdefault(side, []).append(time_ms(graph.replay, reps=50))
                del graph
            one, two = min(ms[False]), min(ms[True])
            print(f"{model} T={T:5}: one stream {one:7.3f}  side stream {two:7.3f}  ratio {one / two:5.3f}  "
                  f"(repeats {ms[False]}, {ms[True]})")
            rows.append(dict(model=model, T=T, one_stream_ms=one, side_stream_ms=two, speedup=one / two))
    schedule.SHARED_ON_SIDE_STREAM = True
    with open(out_dir / "shared_overlap.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
