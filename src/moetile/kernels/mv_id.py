"""Decode path: quantized expert mat-vec per (token, slot) pair (ds4's mul_mv_id), float32.

One program computes BLOCK_N output rows of one pair: out[p, n] = sum_K W[e][n] * rhs(p) with
the exact float32 weights of the packed form (kernels/decode.py; PTX decoders when ASM, their
plain-tl twins otherwise) and float32 activations (no f16 rounding, as ds4's Metal decode).
With FUSE_SWIGLU it computes gate and up of the same rows and writes
mid = silu(min(g, C)) * clamp(u, -C, C) * route_w (float32).

Letters: P = T*k pairs (p = t*k + s), N output rows, K inputs.
"""

import triton
import triton.language as tl

from .decode import weight_tile


@triton.jit
def mul_mv_id_kernel(
    w0, w1, w2,  # planes of the weight (gate, or the only one)
    u0, u1, u2,  # planes of up when FUSE_SWIGLU
    tables_ptr,  # int32 [384]: IQ2_XXS compact lookup words (unused by other forms)
    rhs_ptr,  # f32/f16/bf16 [T, K] (per token) or [P, K] (per pair)
    ids_ptr,  # int32 [P]: expert of each pair; outside [0, E) gives a NaN row
    route_w_ptr,  # f32 [P] (FUSE_SWIGLU only)
    out_ptr,  # f32 [P, N]
    N,
    K,
    rhs_stride,
    TOPK,
    NUM_EXPERTS,
    FORM: tl.constexpr,
    ASM: tl.constexpr,
    RHS_PER_PAIR: tl.constexpr,
    FUSE_SWIGLU: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    e = tl.load(ids_ptr + p)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    if (e < 0) | (e >= NUM_EXPERTS):  # bad id: mark the row, read nothing
        tl.store(out_ptr + p * N + n, tl.full((BLOCK_N,), float("nan"), tl.float32), mask=n_ok)
        return
    if RHS_PER_PAIR:
        rhs_row = rhs_ptr + p * rhs_stride
    else:
        rhs_row = rhs_ptr + (p // TOPK) * rhs_stride
    r = e.to(tl.int64) * N + tl.minimum(n, N - 1)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(rhs_row + k0 + kk).to(tl.float32)[None, :]  # [1, BLOCK_K]
        acc += weight_tile(w0, w1, w2, tables_ptr, r, k0, K, FORM, False, ASM, BLOCK_N, BLOCK_K) * x
        if FUSE_SWIGLU:
            acc2 += weight_tile(u0, u1, u2, tables_ptr, r, k0, K, FORM, False, ASM, BLOCK_N, BLOCK_K) * x
    y = tl.sum(acc, axis=1)
    if FUSE_SWIGLU:
        g = tl.minimum(y, CLAMP)
        u = tl.minimum(tl.maximum(tl.sum(acc2, axis=1), -CLAMP), CLAMP)
        y = g / (1.0 + tl.exp(-g)) * u * tl.load(route_w_ptr + p)
    tl.store(out_ptr + p * N + n, y, mask=n_ok)
