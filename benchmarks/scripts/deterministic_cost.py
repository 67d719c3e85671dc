"""Cost of deterministic mode on the GPU: router logits (cuBLAS f32 vs the fixed-shape Triton kernel,
each candidate block shape checked bit for bit across batches) and the whole DS4 layer (router,
routed experts, shared expert, combine) with deterministic off and on, same run.

    python3 benchmarks/scripts/deterministic_cost.py OUT_DIR
"""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import torch

from moetile import schedule
from moetile.benchmark import Shape, make_weights, time_ms
from moetile.kernels.router import router_logits_kernel
from moetile.moe import moe_forward
from moetile.quant import random_blocks
from moetile.quant.pack import packed

TOKENS = (1, 8, 128, 2048, 8192)
ROUTER_SHAPES = [(16, 64, 32, 4), (32, 64, 32, 4), (16, 32, 32, 4), (32, 32, 32, 4), (64, 64, 32, 8),
                 (16, 64, 64, 4), (32, 128, 32, 8), (16, 16, 64, 2)]


def router_fixed(x, w, shape):
    bt, be, bk, warps = shape
    T, H = x.shape
    E = w.shape[0]
    out = torch.empty(T, E, device=x.device)
    router_logits_kernel[(-(-T // bt), -(-E // be))](x, w, out, T, E, H, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk,
                                                      num_warps=warps)
    return out


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    E, H = 256, 4096
    w = (torch.randn(E, H, device=dev, generator=g) * 0.03).half()
    pool = torch.randn(8192, H, device=dev, generator=g)
    rows = []
    print("router logits [T, 4096] x [4096, 256] -> f32, ms (median)")
    print("shape (bt,be,bk,warps) " + " ".join(f"T={T:>5}" for T in TOKENS) + "  bits")
    base = [time_ms(lambda x=pool[:T]: x.float() @ w.float().t(), reps=50) for T in TOKENS]
    print(f"{'cuBLAS f32':22} " + " ".join(f"{b:7.4f}" for b in base))
    rows += [dict(what="router", variant="cublas", T=T, ms=b) for T, b in zip(TOKENS, base, strict=True)]
    for shape in ROUTER_SHAPES:
        full = router_fixed(pool, w, shape)
        ok = all(torch.equal(router_fixed(pool[i], w, shape), full[i])
                 for i in (torch.randperm(8192, device=dev, generator=g)[:n] for n in (1, 7, 37, 1000)))
        ref = pool.double() @ w.double().t()
        err = ((full.double() - ref).abs().max() / ref.abs().max()).item()
        ts = [time_ms(lambda x=pool[:T]: router_fixed(x, w, shape), reps=50) for T in TOKENS]
        print(f"{str(shape):22} " + " ".join(f"{t:7.4f}" for t in ts) + f"  {'same' if ok else 'DIFFER'} "
              f"err {err:.1e}")
        rows += [dict(what="router", variant=str(shape), T=T, ms=t, bits_same=ok) for T, t in zip(TOKENS, ts,
                                                                                                     strict=True)]
    print(f"policy router shape: {schedule.router_config(False)}")

    print("\nwhole layer (router, routed, shared Q8_0, combine), validate=False, ms (median)")
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
            t_def = time_ms(lambda x=x: moe_forward(x, wts, validate=False, deterministic=False), reps=20)
            t_det = time_ms(lambda x=x: moe_forward(x, wts, validate=False, deterministic=True), reps=20)
            print(f"{model} T={T:5}: default {t_def:7.3f}  deterministic {t_det:7.3f}  x{t_det / t_def:.2f}")
            rows.append(dict(what="layer", variant=f"{model} default", T=T, ms=t_def))
            rows.append(dict(what="layer", variant=f"{model} deterministic", T=T, ms=t_det))
    with open(out_dir / "deterministic_cost.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["what", "variant", "T", "ms", "bits_same"])
        wr.writeheader()
        wr.writerows(rows)
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
