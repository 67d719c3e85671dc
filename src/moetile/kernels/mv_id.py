"""Decode path: quantized expert mat-vec per (token, slot) pair (ds4's mul_mv_id), float32.

One program computes BLOCK_N output rows of one pair: out[p, n] = sum_K W[e][n] * rhs(p) with
the exact float32 weights of the packed form (kernels/decode.py; PTX decoders when ASM, their
plain-tl twins otherwise) and float32 activations (no f16 rounding, as ds4's Metal decode).
With FUSE_SWIGLU it computes gate and up of the same rows and writes
mid = silu(min(g, C)) * clamp(u, -C, C) * route_w (float32; NaN stays NaN). With SPLIT the K inputs are cut into
chunks of K_CHUNK run by separate programs (few pairs would not fill the GPU otherwise): each
writes its partial sums and mv_reduce_kernel adds them in chunk order and applies the epilogue.

Letters: P = T*k pairs (p = t*k + s), N output rows, K inputs.
"""

import triton
import triton.language as tl

from .decode import weight_tile
from .elementwise import swiglu_clamped
from .qdot import load_qact, qdot_tile


@triton.jit
def mul_mv_id_kernel(
    w0, w1, w2,  # planes of the weight (gate, or the only one)
    u0, u1, u2,  # planes of up when FUSE_SWIGLU
    tables_ptr,  # int32 [384]: IQ2_XXS compact lookup words (unused by other forms)
    rhs_ptr,  # f32/f16/bf16 [T, K] (per token) or [P, K] (per pair)
    ids_ptr,  # int32 [P]: expert of each pair; outside [0, E) gives a NaN row
    route_w_ptr,  # f32 [P] (FUSE_SWIGLU only)
    out_ptr,  # f32 [P, N]
    part_ptr,  # f32 [S, P, N] partial sums (SPLIT), of gate when FUSE_SWIGLU
    part2_ptr,  # f32 [S, P, N] partial sums of up (SPLIT and FUSE_SWIGLU)
    qa_ptr,  # QACT: int32 [T or P, K/32, 16] activation words (kernels/act_quant.py)
    qs_ptr,  # QACT: f32 [T or P, K/32] dx/256
    qsum_ptr,  # QACT: int32 [T or P, K/16] activation sums
    N,
    K,
    K_CHUNK,  # inputs per program (SPLIT), a multiple of BLOCK_K
    rhs_stride,
    TOPK,
    NUM_EXPERTS,
    FORM: tl.constexpr,
    ASM: tl.constexpr,
    RHS_PER_PAIR: tl.constexpr,
    FUSE_SWIGLU: tl.constexpr,
    CLAMP: tl.constexpr,
    SPLIT: tl.constexpr,
    QACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    P = tl.num_programs(1)
    e = tl.load(ids_ptr + p)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    if (e < 0) | (e >= NUM_EXPERTS):  # bad id: mark the row, read nothing
        if SPLIT:
            c = tl.program_id(2).to(tl.int64)
            tl.store(part_ptr + (c * P + p) * N + n, tl.full((BLOCK_N,), float("nan"), tl.float32), mask=n_ok)
        else:
            tl.store(out_ptr + p * N + n, tl.full((BLOCK_N,), float("nan"), tl.float32), mask=n_ok)
        return
    row = p if RHS_PER_PAIR else p // TOPK  # of rhs (or of its quantized words)
    r = e.to(tl.int64) * N + tl.minimum(n, N - 1)
    k_start, k_end = 0, K
    if SPLIT:
        k_start = tl.program_id(2) * K_CHUNK
        k_end = tl.minimum(k_start + K_CHUNK, K)
    if QACT:  # integer products with the two-level int8 activations, per group of 32
        acc = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
        qa_row = qa_ptr + row * (K // 32) * 16
        qs_row = qs_ptr + row * (K // 32)
        qsum_row = qsum_ptr + row * (K // 16)
        for k0 in range(k_start, k_end, BLOCK_K):
            words, dxs, sums = load_qact(qa_row, qs_row, qsum_row, k0, BLOCK_K)
            acc += qdot_tile(w0, w1, w2, tables_ptr, r, k0, K, words, dxs, sums, FORM, ASM, BLOCK_N, BLOCK_K)
            if FUSE_SWIGLU:
                acc2 += qdot_tile(u0, u1, u2, tables_ptr, r, k0, K, words, dxs, sums, FORM, ASM, BLOCK_N, BLOCK_K)
    else:
        rhs_row = rhs_ptr + row * rhs_stride
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            x = tl.load(rhs_row + k0 + kk).to(tl.float32)[None, :]  # [1, BLOCK_K]
            acc += weight_tile(w0, w1, w2, tables_ptr, r, k0, K, FORM, False, ASM, BLOCK_N, BLOCK_K) * x
            if FUSE_SWIGLU:
                acc2 += weight_tile(u0, u1, u2, tables_ptr, r, k0, K, FORM, False, ASM, BLOCK_N, BLOCK_K) * x
    y = tl.sum(acc, axis=1)
    if SPLIT:
        c = tl.program_id(2).to(tl.int64)
        tl.store(part_ptr + (c * P + p) * N + n, y, mask=n_ok)
        if FUSE_SWIGLU:
            tl.store(part2_ptr + (c * P + p) * N + n, tl.sum(acc2, axis=1), mask=n_ok)
        return
    if FUSE_SWIGLU:
        y = swiglu_clamped(y, tl.sum(acc2, axis=1), tl.load(route_w_ptr + p), CLAMP)
    tl.store(out_ptr + p * N + n, y, mask=n_ok)


@triton.jit
def mv_reduce_kernel(part_ptr, part2_ptr, route_w_ptr, out_ptr, P, N, S, FUSE_SWIGLU: tl.constexpr,
                     CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    """out[p, n] = sum over chunks c = 0..S-1 in order of part[c, p, n] (then the SwiGLU epilogue
    with part2 as up when FUSE_SWIGLU); grid (P, cdiv(N, BLOCK)). A NaN chunk (bad id) stays NaN."""
    p = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    y = tl.load(part_ptr + p * N + n, mask=ok, other=0.0)
    if FUSE_SWIGLU:
        u = tl.load(part2_ptr + p * N + n, mask=ok, other=0.0)
    for c in range(1, S):
        y += tl.load(part_ptr + (c * P + p) * N + n, mask=ok, other=0.0)
        if FUSE_SWIGLU:
            u += tl.load(part2_ptr + (c * P + p) * N + n, mask=ok, other=0.0)
    if FUSE_SWIGLU:
        y = swiglu_clamped(y, u, tl.load(route_w_ptr + p), CLAMP)
    tl.store(out_ptr + p * N + n, y, mask=ok)
