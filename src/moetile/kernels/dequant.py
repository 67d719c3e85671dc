"""In-kernel dequantization of GGUF blocks, 32 weights of BN rows at a time.

``dequant_group(row_ptr, kb, g, ...)`` returns float32 [BN, 32]: the weights
``256*kb + 32*g + (0..31)`` of the rows whose byte addresses are ``row_ptr`` [BN] (``g`` is a
run-time group index 0..7 inside super-block ``kb``; for Q8_0 a super-block is eight 34-byte
blocks). Layouts: ../shared/ds4-moe-reference.md §4. Per-row scale work is done on [BN]
vectors (per-sub-vector work of IQ2_XXS on [BN, 4]); per-weight work is kept to a few
integer ops (no 64-bit math).
Callers round to f16 for ``tl.dot`` or keep float32 for mat-vec work.
"""

import triton
import triton.language as tl

# GGML type ids, used as the constexpr QTYPE of the kernels.
Q8_0 = tl.constexpr(8)
Q2_K = tl.constexpr(10)
Q4_K = tl.constexpr(12)
IQ2_XXS = tl.constexpr(16)


@triton.jit
def _f16(ptr):
    # every f16 field of every supported block sits at an even byte offset
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _u16(ptr):
    return tl.load(ptr.to(tl.pointer_type(tl.uint16))).to(tl.int32)


@triton.jit
def _u8(ptr):
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _q4_k(row_ptr, kb, g):
    blk = row_ptr + kb * 144  # [BN]
    d = _f16(blk)
    dmin = _f16(blk + 2)
    s_j = _u8(blk + 4 + g)  # scales[g]
    s_j4 = _u8(blk + 8 + g)  # scales[g+4]
    s_jm4 = _u8(blk + g)  # scales[g-4] for g >= 4 (a d/dmin byte otherwise, unused)
    lo = g < 4
    sc = tl.where(lo, s_j & 63, (s_j4 & 0xF) | ((s_jm4 >> 6) << 4))
    m = tl.where(lo, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4))
    l = tl.arange(0, 32)
    q = tl.load(blk[:, None] + 16 + 32 * (g // 2) + l[None, :]).to(tl.int32)  # [BN, 32]
    q = (q >> (4 * (g % 2))) & 0xF
    return (d * sc.to(tl.float32))[:, None] * q.to(tl.float32) - (dmin * m.to(tl.float32))[:, None]


@triton.jit
def _q2_k(row_ptr, kb, g):
    blk = row_ptr + kb * 84
    d = _f16(blk + 80)
    dmin = _f16(blk + 82)
    s0 = _u8(blk + 2 * g)  # sub-block 2g: weights 0..15 of this group
    s1 = _u8(blk + 2 * g + 1)
    l = tl.arange(0, 32)
    q = tl.load(blk[:, None] + 16 + 32 * (g // 4) + l[None, :]).to(tl.int32)
    q = (q >> (2 * (g % 4))) & 3
    first = l[None, :] < 16
    dsc = tl.where(first, (d * (s0 & 0xF).to(tl.float32))[:, None], (d * (s1 & 0xF).to(tl.float32))[:, None])
    dm = tl.where(first, (dmin * (s0 >> 4).to(tl.float32))[:, None], (dmin * (s1 >> 4).to(tl.float32))[:, None])
    return dsc * q.to(tl.float32) - dm


@triton.jit
def _iq2_xxs(row_ptr, kb, g, codes_ptr, BN: tl.constexpr):
    # codes_ptr: int32 [256], entry i = the 8 grid bytes of GRID[i] as 2-bit codes
    # (8 -> 0, 25 -> 1, 43 -> 2), weight j at bits 2j..2j+1; magnitude = 8 + 17c + (c >> 1).
    # Per-sub-vector work runs on [BN, 4] tensors (a [BN] tensor is replicated across every
    # thread that holds a piece of its row; [BN, 4] is not), then expands to [BN, 4, 8].
    blk = row_ptr + kb * 66
    d = _f16(blk)
    grp = blk + 2 + 8 * g
    l4 = tl.arange(0, 4)
    gidx = tl.load(grp[:, None] + l4[None, :]).to(tl.int32)  # [BN, 4] grid index bytes
    b = _u16(grp + 4) | (_u16(grp + 6) << 16)  # 4 x 7 sign bits, then the 4-bit scale
    db = d * (0.5 + ((b >> 28) & 0xF).to(tl.float32)) * 0.25
    code16 = tl.load(codes_ptr + gidx)  # [BN, 4]
    s = (b[:, None] >> (7 * l4[None, :])) & 127  # [BN, 4]
    # the 8th sign bit is the parity of the 7 stored ones (an even count of minus signs)
    p = s ^ (s >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    signs = s | ((p & 1) << 7)
    j8 = tl.arange(0, 8)[None, None, :]
    code = (code16[:, :, None] >> (2 * j8)) & 3  # [BN, 4, 8]
    neg = (signs[:, :, None] >> j8) & 1
    v = ((8 + 17 * code + (code >> 1)) * (1 - 2 * neg)).to(tl.float32)
    return db[:, None] * tl.reshape(v, (BN, 32))


@triton.jit
def _q8_0(row_ptr, kb, g):
    blk = row_ptr + (kb * 8 + g) * 34
    d = _f16(blk)
    l = tl.arange(0, 32)
    q = tl.load(blk[:, None] + 2 + l[None, :]).to(tl.int8, bitcast=True)
    return d[:, None] * q.to(tl.float32)


@triton.jit
def dequant_group(row_ptr, kb, g, QTYPE: tl.constexpr, table_ptr, BN: tl.constexpr):
    """float32 [BN, 32]: weights 256*kb + 32*g + (0..31) of the rows at ``row_ptr`` [BN]."""
    if QTYPE == 12:
        w = _q4_k(row_ptr, kb, g)
    elif QTYPE == 10:
        w = _q2_k(row_ptr, kb, g)
    elif QTYPE == 16:
        w = _iq2_xxs(row_ptr, kb, g, table_ptr, BN)
    else:
        w = _q8_0(row_ptr, kb, g)
    return w
