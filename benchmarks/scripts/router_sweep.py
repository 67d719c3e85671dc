"""Router logits [T, 4096] x [4096, 256] -> f32 on the GPU: cuBLAS f32 against the Triton kernel
(kernels/router.py) at several block shapes and dot precisions ("ieee" FMA, "tf32x3" tensor cores),
each checked bit for bit across batches and against float64.

    python3 benchmarks/scripts/router_sweep.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moetile.benchmark import time_ms

TOKENS = (1, 8, 128, 2048, 8192)


@triton.jit
def _logits(x_ptr, w_ptr, out_ptr, T, E, H, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
            PREC: tl.constexpr):
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        a = tl.load(x_ptr + rt[:, None] * H + (k0 + kk)[None, :], mask=(rt < T)[:, None], other=0.0)
        b = tl.load(w_ptr + re[None, :].to(tl.int64) * H + (k0 + kk)[:, None], mask=(re < E)[None, :], other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    tl.store(out_ptr + rt[:, None] * E + re[None, :], acc, mask=(rt < T)[:, None] & (re < E)[None, :])


def run(x, w, bt, be, bk, warps, stages, prec):
    T, H = x.shape
    E = w.shape[0]
    out = torch.empty(T, E, device=x.device)
    _logits[(triton.cdiv(T, bt), triton.cdiv(E, be))](x, w, out, T, E, H, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk,
                                                       PREC=prec, num_warps=warps, num_stages=stages)
    return out


def main():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    E, H = 256, 4096
    w = (torch.randn(E, H, device=dev, generator=g) * 0.03).half()
    pool = torch.randn(8192, H, device=dev, generator=g)
    ref = pool.double() @ w.double().t()
    scale = ref.abs().max().item()
    cub = pool.float() @ w.float().t()
    print(f"cuBLAS f32 max err / max|ref| {((cub.double() - ref).abs().max().item() / scale):.2e}")
    print("variant".ljust(34) + " ".join(f"T={T:>6}" for T in TOKENS) + "  bits err")
    base = [time_ms(lambda x=pool[:T]: x.float() @ w.float().t(), reps=50) for T in TOKENS]
    print("cuBLAS f32".ljust(34) + " ".join(f"{b:8.4f}" for b in base))
    for prec in ("tf32x3", "ieee"):
        for bt, be, bk, warps, stages in [(16, 32, 64, 4, 3), (16, 64, 64, 4, 3), (32, 64, 64, 4, 3),
                                          (64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3),
                                          (64, 256, 32, 8, 3), (128, 64, 64, 4, 3), (16, 16, 128, 4, 3)]:
            if prec == "ieee" and bt > 32:
                continue
            try:
                full = run(pool, w, bt, be, bk, warps, stages, prec)
            except Exception as e:  # noqa: BLE001
                print(f"{prec} {bt},{be},{bk},{warps},{stages}: {type(e).__name__} {str(e)[:100]}")
                continue
            same = all(torch.equal(run(pool[i], w, bt, be, bk, warps, stages, prec), full[i])
                       for i in (torch.randperm(8192, device=dev, generator=g)[:n] for n in (1, 5, 37, 999)))
            err = (full.double() - ref).abs().max().item() / scale
            cfg = (bt, be, bk, warps, stages, prec)
            ts = [time_ms(lambda x=pool[:T], c=cfg: run(x, w, *c), reps=50) for T in TOKENS]
            print(f"{prec} {bt},{be},{bk},{warps},{stages}".ljust(34) + " ".join(f"{t:8.4f}" for t in ts)
                  + f"  {'same' if same else 'DIFFER'} {err:.1e}")
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
