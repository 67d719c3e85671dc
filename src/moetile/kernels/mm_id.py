"""Grouped quantized expert matmul over expert-major token tiles (ds4's mul_mm_id).

One program computes out^T[n0:n0+BLOCK_N, tile] = W[e][n0:n0+BLOCK_N, :] @ rhs[tile]^T for one
tile of up to BLOCK_M (token, slot) pairs of expert e. Weight rows sit on the MMA's M side and
pairs on its N side, so every token width BLOCK_M runs on the tensor cores. Each BLOCK_K step
decodes a [BLOCK_N, BLOCK_K] weight tile from the packed planes once (kernels/decode.py) and
reuses it for all BLOCK_M pairs; operands are f16, accumulation f32. The scale loads of the next
step are issued before this step decodes (register prefetch), so their latency hides behind the
decode and the MMA; codes and activations are pipelined through shared memory by Triton.

Dimension letters: P = T*k pairs (pair p = t*k + s), N output rows, K inputs, E experts.
"""

import triton
import triton.language as tl

from .decode import decode_raw, load_codes, load_scales
from .elementwise import swiglu_clamped


@triton.jit
def mul_mm_id_kernel(
    w0, w1, w2,  # planes of the weight (gate, or the only one), moetile.quant.pack order
    u0, u1, u2,  # planes of up when FUSE_SWIGLU (else unused)
    tables_ptr,  # int32 [384]: IQ2_XXS compact lookup words (unused by other forms)
    rhs_ptr,  # f16 [T, K] (per token) or [P, K] (per pair)
    route_w_ptr,  # f32 [P]: route weight per pair (FUSE_SWIGLU only)
    out_ptr,  # [P, N]: f32, or f16 mid when FUSE_SWIGLU
    sorted_pairs_ptr,  # int32 [P]: pair ids, expert-major, ascending within an expert
    offsets_ptr,  # int32 [E+2]: start of each expert's run in sorted_pairs; bin E = invalid ids
    tile_expert_ptr,  # int32 [n_tiles]
    tile_row_ptr,  # int32 [n_tiles]: first row of the tile within its expert's run
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = rhs_ptr + rhs_row[None, :] * rhs_stride + kk[:, None]  # [BLOCK_K, BLOCK_M]
    r = e.to(tl.int64) * N + tl.minimum(n, N - 1)  # row of each weight row in the planes

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    a, b = load_scales(w1, w2, r, 0, K, FORM, BLOCK_N, BLOCK_K)
    ua, ub = a, b
    if FUSE_SWIGLU:
        ua, ub = load_scales(u1, u2, r, 0, K, FORM, BLOCK_N, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kn = tl.minimum(k0 + BLOCK_K, K - BLOCK_K)  # the last step reloads its own scales, unused
        na, nb = load_scales(w1, w2, r, kn, K, FORM, BLOCK_N, BLOCK_K)
        c = load_codes(w0, r, k0, K, FORM, BLOCK_N, BLOCK_K)
        x = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
        acc = tl.dot(decode_raw(c, a, b, tables_ptr, FORM, True, ASM, BLOCK_N, BLOCK_K), x, acc)
        a, b = na, nb
        if FUSE_SWIGLU:
            nua, nub = load_scales(u1, u2, r, kn, K, FORM, BLOCK_N, BLOCK_K)
            uc = load_codes(u0, r, k0, K, FORM, BLOCK_N, BLOCK_K)
            acc2 = tl.dot(decode_raw(uc, ua, ub, tables_ptr, FORM, True, ASM, BLOCK_N, BLOCK_K), x, acc2)
            ua, ub = nua, nub
        x_ptrs += BLOCK_K

    if FUSE_SWIGLU:
        rw = tl.load(route_w_ptr + pair, mask=m_ok, other=0.0)
        mid = swiglu_clamped(acc, acc2, rw[None, :], CLAMP)
        tl.store(out_ptr + out_off, mid.to(tl.float16), mask=out_mask)
    else:
        tl.store(out_ptr + out_off, acc, mask=out_mask)
