"""One DS4 layer step (T = 1 and 8, q2 and q4) replayed from CUDA graphs, with and without its
weights in L2, same run. A q2 step reads ~98 MB at T=1 (6 routed experts ~70 MB in their packed
forms, the shared expert 26.7 MB, the router 2 MB), twice the H100's 50 MB L2, yet replaying one
layer on the same x may find some of it there; in a model captured whole, 42 other layers run between
two steps of a layer.

  one     a graph of one step, replayed after the GPU went idle (graph launch included: §12.4, §15.1)
  warm    the same graph queued behind a ~0.5 ms GPU sleep (GPU time only; weights as the last replay left them)
  cold    as warm, after reading a 256 MB buffer (L2 flushed)
  L-layer L copies of the layer (own weights, same values) in one graph, queued, per layer: what a
          model captured whole pays per layer

Each: median of 50 replays; three rounds, the order of the measures rotated each round; the table
gives each measure's least and largest round median.

    python3 benchmarks/scripts/decode_cold.py [L]     # L = 8
"""

from __future__ import annotations

import statistics
import sys

import torch
import triton
from decode_graph import ds4_layer, graphed

from moetile.moe import DS4MoE


def median_ms(gr, *, queue: bool, flush: torch.Tensor | None, per: int = 1, reps: int = 50) -> float:
    for _ in range(3):
        gr.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.sum()  # reads 256 MB: L2 holds other lines, none dirty (a write would flush during the step)
        if queue:
            torch.cuda._sleep(1_000_000)  # cycles (~0.5 ms): the host enqueues the replay before the GPU reaches it
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        gr.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per)
    return statistics.median(times)


def one_model(model: str, L: int, flush: torch.Tensor) -> None:
    layers = [DS4MoE(ds4_layer(model), validate=False) for _ in range(L)]
    for T in (1, 8):
        x = torch.randn(T, 4096, device="cuda")
        want = layers[0](x)
        one = graphed(layers[0], x)
        many = graphed(lambda x: [la(x) for la in layers], x)
        measures = {  # name: (graph, queued, flush buffer, layers per replay)
            "one": (one, False, None, 1),
            "warm": (one, True, None, 1),
            "cold": (one, True, flush, 1),
            f"{L}-layer": (many, True, None, L),
        }
        names = list(measures)
        got: dict[str, list[float]] = {n: [] for n in names}
        for r in range(3):
            for n in names[r:] + names[:r]:
                gr, queue, buf, per = measures[n]
                got[n].append(median_ms(gr, queue=queue, flush=buf, per=per))
        assert torch.equal(layers[0](x), want), "the layer's output changed between calls"
        print(f"{model} T={T}: " + "  ".join(f"{n} [{min(v):.4f}, {max(v):.4f}]" for n, v in got.items()),
              flush=True)


def main(L: int) -> None:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"ms per layer step, [least, largest] of 3 round medians of 50 replays", flush=True)
    for model in ("q2", "q4"):
        one_model(model, L, flush)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
