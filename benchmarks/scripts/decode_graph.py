"""One DS4 layer step (router, routed experts, shared Q8_0 expert, combine) at decode sizes, eager
against CUDA-graph replay, default and deterministic, same run; the layer at prefill sizes eager.
Graph columns: "graph" replays a graph of one step after the GPU went idle (its launch included,
median of 50; the measure of BENCHMARKS §12.4 and §15.1); "graph/20" replays a graph of the same step
20 times on the same x, per step, the better of two medians of 50 (moetile.benchmark.graph_ms, the
measure of the per-op sweeps). Both replay one layer on one x: its weights may stay in L2
(decode_cold.py is written to measure that).

    python3 benchmarks/scripts/decode_graph.py OUT_DIR
"""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

from moetile.benchmark import Shape, graph_ms, make_weights, time_ms
from moetile.moe import DS4MoE, MoEWeights
from moetile.quant import random_blocks
from moetile.quant.pack import packed


def ds4_layer(model: str) -> MoEWeights:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    w = make_weights(model, Shape(), dev)
    H, Fs = 4096, 2048
    w = replace(w, router=(torch.randn(256, H, device=dev, generator=g) * 0.03).half(),
                bias=torch.rand(256, device=dev, generator=g) * 0.05,
                shared_gate=packed(random_blocks("Q8_0", (Fs, H), g, dev)),
                shared_up=packed(random_blocks("Q8_0", (Fs, H), g, dev)),
                shared_down=packed(random_blocks("Q8_0", (H, Fs), g, dev)))
    return w


def graphed(layer, x):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(x)
    return graph


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print("whole DS4 layer step, ms (eager and graph: median of 50; graph/20: the better of two medians of 50)")
    for model in ("q2", "q4"):
        w = ds4_layer(model)
        for det in (False, True):
            layer = DS4MoE(w, validate=False, deterministic=det)
            for T in (1, 2, 4, 8, 16, 128, 2048):
                x = torch.randn(T, 4096, device="cuda")
                eager = time_ms(lambda x=x, layer=layer: layer(x), reps=50)
                graph = graphed(layer, x) if T <= 16 else None
                replay = time_ms(graph.replay, reps=50) if graph is not None else float("nan")
                del graph
                per20 = (graph_ms(lambda x=x, layer=layer: layer(x), n=20, reps=50, rounds=2) if T <= 16
                         else float("nan"))
                mode = "deterministic" if det else "default"
                print(f"{model} {mode:13} T={T:5}: eager {eager:7.4f}  graph {replay:7.4f}  graph/20 {per20:7.4f}",
                      flush=True)
                rows.append(dict(model=model, mode=mode, T=T, eager_ms=eager, graph_ms=replay, graph20_ms=per20))
    with open(out_dir / "decode_graph.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
