"""Decode path: quantized expert mat-vec per (token, slot) pair (ds4's mul_mv_id), float32.

One program computes BLOCK_N output rows of one pair: out[p, n] = sum_K dequant(W[e][n]) * rhs(p)
with float32 weights and activations (no f16 rounding, as ds4's Metal decode). With
FUSE_SWIGLU it computes gate and up of the same rows and writes
mid = silu(min(g, C)) * clamp(u, -C, C) * route_w (float32).

Letters: P = T*k pairs (p = t*k + s), N output rows, K inputs.
"""

import triton
import triton.language as tl

from .dequant import dequant_group


@triton.jit
def mul_mv_id_kernel(
    w_ptr,  # uint8 [E, N, row_bytes]
    w2_ptr,  # uint8 [E, N, row_bytes]: up weights when FUSE_SWIGLU
    table_ptr,  # int32 [256]: IQ2_XXS grid codes (unused for other types)
    rhs_ptr,  # f32/f16 [T, K] (per token) or [P, K] (per pair)
    ids_ptr,  # int32 [P]: expert of each pair (validated or clamped by the caller)
    route_w_ptr,  # f32 [P] (FUSE_SWIGLU only)
    out_ptr,  # f32 [P, N]
    N,
    K,
    row_bytes,
    expert_bytes,
    rhs_stride,
    TOPK,
    NUM_EXPERTS,
    QTYPE: tl.constexpr,
    RHS_PER_PAIR: tl.constexpr,
    FUSE_SWIGLU: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
    n_safe = tl.minimum(n, N - 1).to(tl.int64)
    row_ptr = w_ptr + e.to(tl.int64) * expert_bytes + n_safe * row_bytes
    if FUSE_SWIGLU:
        row2_ptr = w2_ptr + e.to(tl.int64) * expert_bytes + n_safe * row_bytes
    kk = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_N, 32), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, 32), dtype=tl.float32)
    for it in range(0, K // 32):
        x = tl.load(rhs_row + it * 32 + kk).to(tl.float32)[None, :]  # [1, 32]
        acc += dequant_group(row_ptr, it // 8, it % 8, QTYPE, table_ptr, BLOCK_N) * x
        if FUSE_SWIGLU:
            acc2 += dequant_group(row2_ptr, it // 8, it % 8, QTYPE, table_ptr, BLOCK_N) * x
    y = tl.sum(acc, axis=1)
    if FUSE_SWIGLU:
        g = tl.minimum(y, CLAMP)
        u = tl.minimum(tl.maximum(tl.sum(acc2, axis=1), -CLAMP), CLAMP)
        y = g / (1.0 + tl.exp(-g)) * u * tl.load(route_w_ptr + p)
    tl.store(out_ptr + p * N + n, y, mask=n_ok)
