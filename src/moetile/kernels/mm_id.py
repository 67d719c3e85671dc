"""Grouped quantized expert matmul over expert-major token tiles (ds4's mul_mm_id).

One program computes out^T[n0:n0+BLOCK_N, tile] = dequant(W[e][n0:n0+BLOCK_N, :]) @ rhs[tile]^T
for one tile of up to BLOCK_M (token, slot) pairs of expert e. Weight rows sit on the MMA's M
side and pairs on its N side, so every token width BLOCK_M in {16, 32, 64, 128} runs on the
tensor cores. Each weight block is dequantized once per tile and reused for all BLOCK_M pairs.

Dimension letters: P = T*k pairs (pair p = t*k + s), N output rows, K inputs, E experts.
"""

import triton
import triton.language as tl

from .dequant import dequant_group


@triton.jit
def mul_mm_id_kernel(
    w_ptr,  # uint8 [E, N, row_bytes]: GGUF blocks (gate, or the only weight)
    w2_ptr,  # uint8 [E, N, row_bytes]: up weights when FUSE_SWIGLU, else unused
    table_ptr,  # int32 [256]: IQ2_XXS grid as 2-bit codes (unused for other types)
    rhs_ptr,  # [T, K] (per token) or [P, K] (per pair); f16 (any float type loads)
    route_w_ptr,  # f32 [P]: route weight per pair (FUSE_SWIGLU only)
    out_ptr,  # [P, N]: f32, or f16 mid when FUSE_SWIGLU
    sorted_pairs_ptr,  # int32 [P]: pair ids, expert-major, ascending within an expert
    offsets_ptr,  # int32 [E+2]: start of each expert's run in sorted_pairs; bin E = invalid ids
    tile_expert_ptr,  # int32 [n_tiles]
    tile_row_ptr,  # int32 [n_tiles]: first row of the tile within its expert's run
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_t)
    row0 = tl.load(tile_row_ptr + pid_t)
    start = tl.load(offsets_ptr + e)
    count = tl.load(offsets_ptr + e + 1) - start
    if row0 >= count:  # surplus program of the upper-bound grid
        return

    m = row0 + tl.arange(0, BLOCK_M)
    m_ok = m < count
    pair = tl.load(sorted_pairs_ptr + start + m, mask=m_ok, other=0).to(tl.int64)  # [BLOCK_M]
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    out_off = pair[None, :] * N + n[:, None]  # [BLOCK_N, BLOCK_M]
    out_mask = n_ok[:, None] & m_ok[None, :]

    if e == NUM_EXPERTS:  # pairs whose expert id was out of range: mark them, read nothing
        nan = tl.full((BLOCK_N, BLOCK_M), float("nan"), tl.float32)
        tl.store(out_ptr + out_off, nan.to(out_ptr.dtype.element_ty), mask=out_mask)
        return

    if RHS_PER_PAIR:
        rhs_row = pair
    else:
        rhs_row = pair // TOPK
    rhs_base = rhs_ptr + rhs_row[None, :] * rhs_stride  # [1, BLOCK_M]
    n_safe = tl.minimum(n, N - 1).to(tl.int64)
    row_ptr = w_ptr + e.to(tl.int64) * expert_bytes + n_safe * row_bytes  # [BLOCK_N]
    if FUSE_SWIGLU:
        row2_ptr = w2_ptr + e.to(tl.int64) * expert_bytes + n_safe * row_bytes
    kk = tl.arange(0, 32)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(0, K // 32):
        kb = it // 8
        g = it % 8
        x = tl.load(rhs_base + (it * 32 + kk)[:, None], mask=m_ok[None, :], other=0.0)
        x = x.to(tl.float16)  # [32, BLOCK_M]
        w = dequant_group(row_ptr, kb, g, QTYPE, table_ptr, BLOCK_N).to(tl.float16)  # [BLOCK_N, 32]
        acc = tl.dot(w, x, acc)
        if FUSE_SWIGLU:
            w2 = dequant_group(row2_ptr, kb, g, QTYPE, table_ptr, BLOCK_N).to(tl.float16)
            acc2 = tl.dot(w2, x, acc2)

    if FUSE_SWIGLU:
        # ds4 order: gate clamped above only, up clamped both ways, route weight before down
        g = tl.minimum(acc, CLAMP)
        u = tl.minimum(tl.maximum(acc2, -CLAMP), CLAMP)
        rw = tl.load(route_w_ptr + pair, mask=m_ok, other=0.0)
        mid = g / (1.0 + tl.exp(-g)) * u * rw[None, :]
        tl.store(out_ptr + out_off, mid.to(tl.float16), mask=out_mask)
    else:
        tl.store(out_ptr + out_off, acc, mask=out_mask)
