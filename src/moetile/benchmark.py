"""Benchmark and profile machinery behind `moetile bench` and `moetile profile`.

Times are medians of CUDA-event-timed runs after warm-up, with several input sets rotated so
caches do not flatter (expert weights are far larger than L2 anyway). Every table carries the
baseline measured in the same run (torch bf16 on pre-dequantized weights) and the floor of
this card: max(weight bytes / measured copy bandwidth, FLOPs / measured f16 tensor-core rate).

Letters: T tokens, k experts per token, E experts, H hidden, F expert FFN width.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from .moe import MoEWeights, moe_forward
from .quant import random_blocks

PRESETS = {"q2": ("IQ2_XXS", "Q2_K"), "q4": ("Q4_K", "Q4_K")}
ROUTINGS = ("uniform", "zipf", "worst")


@dataclass(frozen=True)
class Shape:
    E: int = 256
    k: int = 6
    H: int = 4096
    F: int = 2048


@dataclass(frozen=True)
class Ceilings:
    copy_gbs: float  # device-to-device copy, bytes read + written per second / 1e9
    f16_tflops: float  # f16 matmul 8192^3


def time_ms(fn, *, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        import time

        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(step, *, n: int = 20, reps: int = 20, rounds: int = 1) -> float:
    """Milliseconds per call of ``step()`` (CUDA GPU only): warmed up once on a side stream, then n calls
    captured in one CUDA graph, replayed; the least of ``rounds`` medians of ``reps`` replays, over n."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(n):
            step()
    ms = min(time_ms(gr.replay, reps=reps) for _ in range(rounds)) / n
    del gr
    return ms


def measure_ceilings() -> Ceilings:
    """Copy bandwidth and f16 tensor-core rate of this GPU, measured now."""
    n = 1 << 29  # 0.5 Gi f16 elements: 1 GiB read + 1 GiB written per copy
    src = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20)
    copy = 2 * n * 2 / ms / 1e6
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    m2 = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = time_ms(lambda: m @ m2, reps=20)
    return Ceilings(copy, 2 * 8192**3 / ms / 1e9)


def make_weights(model: str, shape: Shape, device, seed: int = 0, form: str = "auto") -> MoEWeights:
    """Random valid expert weights of a preset, packed (``form`` picks the IQ2_XXS form)."""
    gq, dq = PRESETS[model]
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, F = shape.E, shape.H, shape.F
    return MoEWeights(
        random_blocks(gq, (E, F, H), g, device), random_blocks(gq, (E, F, H), g, device),
        random_blocks(dq, (E, H, F), g, device), top_k=shape.k,
    ).packed(form)


def make_routing(kind: str, T: int, shape: Shape, device, seed: int = 0):
    """(ids int32 [T, k], weights f32 [T, k]) for a routing scenario: uniform random; zipf
    (expert e drawn with probability ~ 1/(e+1)); worst (every token on the same k experts)."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, k = shape.E, shape.k
    if kind == "uniform":
        ids = torch.rand(T, E, device=device, generator=g).topk(k, dim=1).indices
    elif kind == "zipf":
        p = 1.0 / torch.arange(1, E + 1, device=device, dtype=torch.float32)
        perm = torch.randperm(E, device=device, generator=g)
        ids = perm[torch.multinomial(p.expand(T, E), k, replacement=False, generator=g)]
    elif kind == "worst":
        ids = torch.randperm(E, device=device, generator=g)[:k].expand(T, k)
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {kind!r}")
    w = torch.rand(T, k, device=device, generator=g) + 0.1
    return ids.to(torch.int32).contiguous(), (w / w.sum(1, keepdim=True) * 1.5).contiguous()


def layer_flops(T: int, shape: Shape) -> float:
    return 2.0 * T * shape.k * 3 * shape.H * shape.F


def weight_bytes(w: MoEWeights, ids: torch.Tensor) -> int:
    """Bytes of the experts the batch touches (each read once)."""
    used = int(torch.unique(ids).numel())
    per_expert = (w.gate.nbytes + w.up.nbytes + w.down.nbytes) // w.gate.shape[0]
    return used * per_expert


class Bf16Baseline:
    """torch bf16 on pre-dequantized weights: grouped GEMMs (torch._grouped_mm where it runs,
    else a per-expert loop), SwiGLU with the ds4 clamps, slot sum. Same work as the layer."""

    def __init__(self, w: MoEWeights):
        self.E = w.gate.shape[0]
        self.gate, self.up, self.down = (dequantize_bf16(q) for q in (w.gate, w.up, w.down))  # [E, N, K] bf16
        self.grouped = hasattr(torch, "_grouped_mm")

    def _gmm(self, a, wt, offs, counts):
        if self.grouped:
            try:
                return torch._grouped_mm(a, wt.transpose(-2, -1), offs=offs)
            except (RuntimeError, NotImplementedError):
                self.grouped = False
        out, start = [], 0
        for e, c in enumerate(counts):
            out.append(a[start : start + c] @ wt[e].T)
            start += c
        return torch.cat(out)

    def __call__(self, x, ids, rw):
        T, k = ids.shape
        flat = ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts_t = torch.bincount(flat, minlength=self.E)
        offs = torch.cumsum(counts_t, 0).to(torch.int32)
        counts = counts_t.tolist() if not self.grouped else None
        a = x.to(torch.bfloat16)[order // k]
        g = self._gmm(a, self.gate, offs, counts).float().clamp(max=10.0)
        u = self._gmm(a, self.up, offs, counts).float().clamp(-10.0, 10.0)
        mid = (torch.nn.functional.silu(g) * u * rw.reshape(-1)[order, None]).to(torch.bfloat16)
        y = self._gmm(mid, self.down, offs, counts).float()
        slots = torch.empty_like(y)
        slots[order] = y
        return slots.view(T, k, -1).sum(1)


def dequantize_bf16(q, chunk: int = 16) -> torch.Tensor:
    """bf16 [E, N, K] of a quantized expert stack, dequantized ``chunk`` experts at a time (the
    float32 temporaries of all 256 DS4 experts at once would not fit beside the weights)."""
    return torch.cat([
        torch.stack([q.expert(e).dequantize(torch.bfloat16) for e in range(i, min(i + chunk, q.shape[0]))])
        for i in range(0, q.shape[0], chunk)
    ])


def run_layer(w: MoEWeights, x, ids, rw, **plan):
    """The timed unit: gate+up+SwiGLU+down+slot sum of the routed experts, routing given."""
    return moe_forward(x, w, topk_ids=ids, topk_weights=rw, include_shared=False, validate=False, **plan)


def profile_layer(w: MoEWeights, x, token_ids=None, reps: int = 10, **plan) -> dict[str, float]:
    """Median GPU milliseconds per stage of one full layer (router included). The stream first
    sleeps ~10 ms on the GPU so that the host queues the whole layer ahead: a stage's time is its
    kernels' GPU time, not the host's launch gaps (those are eager vs graph: decode_graph.py)."""
    names: list[str] = []
    events: list = []

    def hook(name):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        names.append(name)
        events.append(ev)

    per: dict[str, list[float]] = {}
    for _ in range(reps + 2):
        names.clear()
        events.clear()
        torch.cuda._sleep(20_000_000)  # cycles: ~10 ms at H100 clocks, longer than the host needs
        hook("start")
        moe_forward(x, w, token_ids, stage_hook=hook, validate=False, **plan)
        torch.cuda.synchronize()
        for i in range(1, len(events)):
            per.setdefault(names[i], []).append(events[i - 1].elapsed_time(events[i]))
    return {n: statistics.median(v[2:]) for n, v in per.items()}
