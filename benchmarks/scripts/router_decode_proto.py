"""Prototype: the router's logits for a few tokens as a float32 FMA mat-vec (each program a block of
experts x one H chunk, the whole chunk in one load) against the policy's 3xTF32 tile kernel, DS4
shapes, GPU time of CUDA graph replays (logits + the same select kernel), ids vs float64.
python3 benchmarks/scripts/router_decode_proto.py"""
import torch
import triton
import triton.language as tl

from moetile import schedule
from moetile.benchmark import graph_ms
from moetile.kernels.router import route_select_kernel
from moetile.ops.router import route
from moetile.reference_routing import route_ref


@triton.jit
def logits_mv_kernel(x_ptr, w_ptr, part_ptr, T, E, H, BLOCK_E: tl.constexpr, H_CHUNK: tl.constexpr):
    re = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    s = tl.program_id(1)
    hh = s * H_CHUNK + tl.arange(0, H_CHUNK)
    w = tl.load(w_ptr + re[:, None] * H + hh[None, :]).to(tl.float32)  # [BLOCK_E, H_CHUNK]
    for t in range(T):
        xv = tl.load(x_ptr + t * H + hh).to(tl.float32)
        tl.store(part_ptr + (s * T + t) * E + re, tl.sum(w * xv[None, :], axis=1))


def route_mv(x, w, bias, k, scale, block_e, chunk, warps):
    T, H = x.shape
    E = w.shape[0]
    S = H // chunk
    part = torch.empty((S, T, E), device=x.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=x.device)
    wts = torch.empty((T, k), device=x.device)
    logits_mv_kernel[(E // block_e, S)](x, w, part, T, E, H, BLOCK_E=block_e, H_CHUNK=chunk, num_warps=warps)
    route_select_kernel[(T,)](part, bias, ids, ids, ids, wts, T, E, 1, S, float(scale), TOPK=k, HAS_BIAS=True,
                              HASH=False, BLOCK_T=1, BLOCK_E=256, BLOCK_K=8, num_warps=1)
    return ids, wts


def replay_ms(fn, reps=200):
    """GPU milliseconds per call of ``fn``: 20 calls in one CUDA graph, median of reps/20 replays."""
    return graph_ms(fn, n=20, reps=reps // 20)


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    E, H, k = 256, 4096, 6
    w = (torch.randn(E, H, device=dev, generator=g) * 0.03).half()
    bias = torch.rand(E, device=dev, generator=g) * 0.05
    pool = torch.randn(64, H, device=dev, generator=g)
    ids_ref, w_ref = route_ref(pool, w, bias=bias, k=k)
    ref_ids, ref_w = route(pool, w, bias=bias, k=k)
    print(f"policy tile kernel: ids = f64 {(ref_ids.cpu() == ids_ref.cpu()).all(1).float().mean():.4f}")
    for T in (1, 2, 4, 8):
        x = pool[:T]
        base = replay_ms(lambda x=x: route(x, w, bias=bias, k=k))
        row = [f"T={T}: policy {base * 1e3:.1f} us"]
        for be, chunk, warps in ((16, 512, 4), (8, 512, 4), (32, 512, 4), (16, 256, 4), (8, 256, 2), (16, 1024, 8),
                                 (4, 512, 2), (8, 512, 8)):
            ids, wts = route_mv(x, w, bias, k, 1.5, be, chunk, warps)
            ok = (ids.cpu() == ids_ref[:T].cpu()).all().item()
            dw = (wts.double() - w_ref[:T].to(dev)).abs().max().item()
            t = replay_ms(lambda x=x, be=be, c=chunk, nw=warps: route_mv(x, w, bias, k, 1.5, be, c, nw))
            row.append(f"mv({be},{chunk},{warps}) {t * 1e3:.1f} us ids={'ok' if ok else 'DIFF'} dw {dw:.1e}")
        print("  ".join(row), flush=True)
    print("shape of the policy", schedule._ROUTER_SHAPE)


if __name__ == "__main__":
    main()
