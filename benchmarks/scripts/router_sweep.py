"""The layer's router on the GPU (ops/router.route: logit chunks + select kernel) at several launch
shapes, against routing.route (cuBLAS float32 SGEMM + torch steps), DS4 shapes (E=256, H=4096,
k=6, with bias), GPU time (CUDA graph replay). Each shape is checked bit for bit across batches,
and its ids against the float64 reference (share of the first 512 tokens that agree).

    python3 benchmarks/scripts/router_sweep.py
"""

from __future__ import annotations

import torch
import triton

from moetile import routing, schedule
from moetile.benchmark import graph_ms
from moetile.ops.router import route
from moetile.reference_routing import route_ref

TOKENS = (1, 2, 8, 128, 2048, 8192)
# (block_t, block_e, block_k, warps, stages, h_chunk, select_t, select_warps): logits shapes with the
# policy's select kernel; the first row is the policy. "= policy": the same ids and weight bits as the
# policy's shape for all 8192 tokens (a shape that differs from it only in its tile could then serve
# small T without costing batch invariance); else how many of the 8192*k weights differ.
SELECT = (1, 1)
LOGITS = [(64, 64, 32, 4, 3, 512), (64, 16, 32, 4, 3, 512), (64, 32, 32, 4, 3, 512), (64, 128, 32, 8, 3, 512),
          (64, 256, 32, 8, 3, 512), (128, 64, 32, 8, 3, 512), (16, 64, 32, 4, 3, 512), (16, 16, 32, 4, 3, 512),
          (16, 16, 32, 1, 3, 512), (64, 64, 32, 4, 2, 512), (64, 64, 32, 4, 4, 512), (64, 64, 16, 4, 3, 512),
          (64, 64, 64, 4, 3, 512), (64, 32, 32, 4, 3, 256), (64, 64, 32, 4, 3, 256), (64, 16, 32, 4, 3, 256),
          (64, 64, 32, 4, 3, 1024)]
SHAPES = [lg + SELECT for lg in LOGITS]


def replay_ms(fn) -> float:
    """GPU milliseconds of ``fn`` captured in a CUDA graph (no host launch time)."""
    return graph_ms(fn, n=1, reps=100)


def main():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    E, H, k = 256, 4096, 6
    w = (torch.randn(E, H, device=dev, generator=g) * 0.03).half()
    bias = torch.rand(E, device=dev, generator=g) * 0.05
    pool = torch.randn(8192, H, device=dev, generator=g)
    ids_ref, _ = route_ref(pool[:512], w, bias=bias, k=k)
    head = "route, ms (CUDA graph replay, median of 100)".ljust(40)
    print(head + " ".join(f"T={T:>6}" for T in TOKENS) + "  bits  ids=ref  = policy")
    base = [replay_ms(lambda x=pool[:T]: routing.route(x, w, bias=bias, k=k)) for T in TOKENS]
    print("routing.route (cuBLAS + torch)".ljust(40) + " ".join(f"{b:8.4f}" for b in base))
    policy = None
    for shape in SHAPES:
        schedule._ROUTER_SHAPE = shape
        ids, wts = route(pool, w, bias=bias, k=k)
        same = all(
            all(torch.equal(a, b[i]) for a, b in zip(route(pool[i], w, bias=bias, k=k), (ids, wts), strict=True))
            for i in (torch.randperm(8192, device=dev, generator=g)[:n] for n in (1, 5, 37, 999)))
        agree = (ids[:512].cpu() == ids_ref.cpu()).all(1).float().mean().item()
        policy = policy or (ids, wts)
        eq = torch.equal(ids, policy[0]) and torch.equal(wts, policy[1])
        vs = "same" if eq else f"{int((wts != policy[1]).sum())} w differ"
        ts = [replay_ms(lambda x=pool[:T]: route(x, w, bias=bias, k=k)) for T in TOKENS]
        print(str(shape).ljust(40) + " ".join(f"{t:8.4f}" for t in ts) + f"  {'same' if same else 'DIFFER'}"
              f"  {agree:.4f}  {vs}", flush=True)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
