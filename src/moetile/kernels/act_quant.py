"""Two-level int8 quantization of activations for the integer mat-vec (kernels/qdot.py), no policy.

Per row and 32-block of K: dx = max|x| / 127, qh = clamp(round(x / dx), +-127),
ql = clamp(round((x - qh*dx) * 256 / dx), +-127), so x ~= dx/256 * (256*qh + ql) within dx/256
(dx/512 but where the clamp of ql bites).
A block holding a NaN gets dx = NaN (every output of it NaN); an all-zero block dx = 0; a block
holding an inf gets dx = inf and every word 0, so the products of its row are NaN (where the float32
mat-vec gives +-inf). Below max|x| = 2^-100 the block is quantized at 2^100 times its size and dx
scaled back, so its stored scale (dx/256, a float32 denormal there) bounds the precision.
Layouts (``LAYOUT``, kernels/qdot.py's docstring): 0 NATURAL, 1 Q4K, 2 Q2K.
"""

import triton
import triton.language as tl

TINY = tl.constexpr(7.888609052210118e-31)  # 2^-100
UP = tl.constexpr(1.2676506002282294e30)  # 2^100
DOWN = tl.constexpr(7.888609052210118e-31)  # 2^-100


@triton.jit
def _pack(q, BB: tl.constexpr):
    """[BB, 16, 4] int32 bytes (signed) -> [BB, 16] int32 words, byte j from q[..., j]."""
    a, b = tl.split(tl.reshape(q, (BB, 16, 2, 2)))  # a: bytes 0, 2; b: 1, 3
    q0, q2 = tl.split(a)
    q1, q3 = tl.split(b)
    return (q0 & 255) | ((q1 & 255) << 8) | ((q2 & 255) << 16) | (q3 << 24)


@triton.jit
def act_quant_kernel(
    x_ptr,  # f32/f16/bf16 [R, K], rows ``x_stride`` apart, K contiguous
    qa_ptr,  # int32 [R, K/32, 16] out: the words
    qs_ptr,  # f32 [R, K/32] out: dx / 256
    qsum_ptr,  # int32 [R, K/16] out: sum of 256*qh + ql per 16 weights
    NB,  # K / 32
    x_stride,
    LAYOUT: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """grid (R, cdiv(NB, BLOCK_B))."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = blk < NB
    xrow = x_ptr + row * x_stride
    # the 16 words x 4 bytes of a block: source weight and level (0: qh, 1: ql) of each byte
    u = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 4)[None, :]
    if LAYOUT == 0:  # per 8 weights w: H(lo 4), H(hi 4), L(lo 4), L(hi 4)
        src = 8 * (u // 4) + 4 * (u % 2) + j
        lev = (u // 2) % 2
    elif LAYOUT == 1:  # per 8 weights w: H(even), H(odd), L(even), L(odd)
        src = 8 * (u // 4) + 2 * j + (u % 2)
        lev = (u // 2) % 2
    else:  # per 16 weights w: H0..H3, L0..L3 with Hi = weights i, i+4, i+8, i+12
        src = 16 * (u // 8) + (u % 4) + 4 * j
        lev = (u // 4) % 2
    xs = tl.load(xrow + blk[:, None, None] * 32 + src[None, :, :], mask=ok[:, None, None], other=0.0)
    xs = xs.to(tl.float32)  # [BB, 16, 4]: every weight of the block twice
    amax = tl.max(tl.max(tl.abs(xs), axis=2), axis=1)
    has_nan = tl.max(tl.max((xs != xs).to(tl.int32), axis=2), axis=1) > 0
    # 127/amax overflows below amax ~ 3.7e-37: such a block is scaled up by 2^100 first (exact; every
    # other block is multiplied by 1, so its bits are unchanged) and its dx scaled back at the store
    tiny = amax < TINY
    up = tl.where(tiny, UP, 1.0)
    xs = xs * up[:, None, None]
    amax = amax * up
    dx = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    qh = _round127(xs * inv[:, None, None])
    ql = _round127((xs - qh * dx[:, None, None]) * (inv * 256.0)[:, None, None])
    q = tl.where(lev[None, :, :] == 0, qh, ql).to(tl.int32)
    words = _pack(q, BLOCK_B)
    base = row * NB + blk
    tl.store(qa_ptr + base[:, None] * 16 + tl.arange(0, 16)[None, :], words, mask=ok[:, None])
    tl.store(qs_ptr + base, tl.where(has_nan, float("nan"), dx * 0.00390625 * tl.where(tiny, DOWN, 1.0)), mask=ok)
    # in every layout words 0-7 hold weights 0-15 (each once as qh, once as ql), words 8-15 the rest
    # (masked sums: a reshape to [BB, 2, 32] summed wrongly on the H100 for layout 0, Triton 3.6)
    a = tl.sum(tl.where(lev[None, :, :] == 0, q * 256, q), axis=2)  # [BB, 16]
    first = (tl.arange(0, 16) < 8)[None, :]
    tl.store(qsum_ptr + base * 2, tl.sum(tl.where(first, a, 0), axis=1), mask=ok)
    tl.store(qsum_ptr + base * 2 + 1, tl.sum(tl.where(first, 0, a), axis=1), mask=ok)


@triton.jit
def _round127(v):
    """round half up, clamped to [-127, 127] (f32 in, f32 out; NaN -> 0)."""
    r = tl.floor(v + 0.5)
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    return tl.where(r == r, r, 0.0)
