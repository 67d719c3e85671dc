"""Integer dot products of packed weight tiles with quantized activations (the mat-vec's "q8x2" mode), no policy.

Activations come from kernels/act_quant.py: per token (or pair) and 32-block of K, x ~= dx/256 * a with
a = 256*qh + ql, qh and ql int8 (two levels: |x - x^| <= dx/512 + rounding, dx = max|x|/127), stored as
16 int32 words of four bytes in the layout of the weight form (``act_layout``), so that each
code word of the weights meets its activations byte for byte:

* NATURAL (IQ2_XXS fast/compact, Q8_0): per code word w of 8 weights, [H(8w..8w+3), H(8w+4..8w+7),
  L(8w..8w+3), L(8w+4..8w+7)] (H: the qh bytes, L: the ql bytes); Q8_0 words of 4 weights pick theirs.
* Q4K: per code word w of 8 nibbles, [H(even), H(odd), L(even), L(odd)] (weights 8w+0,2,4,6 / 1,3,5,7).
* Q2K: per i32 code word w of 16 2-bit codes, [H0..H3, L0..L3], Hi = weights 16w+i, +4, +8, +12.

``qdot_tile`` returns f32 [BN, G] (G = BK/32 groups): per row and group, the integer sum
S = sum(q_w * a) (exact in int32) times the group's weight scale and dx/256, and for the K-quants the
offset term -dmin*m * sum(a) (``sums``: int32 sum of a per 16 weights). The PTX decoders (ASM) do four
products per ``dp4a``; each has a plain-tl twin computing the same integers (CI runs the twins).
"""

import triton
import triton.language as tl

from .decode import load_scales

# --------------------------------------------------------------------------- PTX (one code word per call)
# IQ2_XXS code word (nibble j = c | neg << 2 of weight j): one byte permute per four weights reads
# the signed grid value of each nibble from the two table words (8, 25, 43, 60 and their negatives).
_IQ2_DOT = tl.constexpr("""{
.reg .b32 T0, T1, b0, b1, t, sh, sl, z;
mov.b32 z, 0;
mov.b32 T0, 0x3C2B1908;
mov.b32 T1, 0xC4D5E7F8;
prmt.b32 b0, T0, T1, $1;
shr.b32 t, $1, 16;
prmt.b32 b1, T0, T1, t;
dp4a.s32.s32 sh, b0, $2, z;
dp4a.s32.s32 sh, b1, $3, sh;
dp4a.s32.s32 sl, b0, $4, z;
dp4a.s32.s32 sl, b1, $5, sl;
shl.b32 sh, sh, 8;
add.s32 $0, sh, sl;
}""")
# Q4_K code word (nibble j = weight j): even and odd nibbles as unsigned bytes.
_U4_DOT = tl.constexpr("""{
.reg .b32 b0, b1, t, sh, sl, z;
mov.b32 z, 0;
and.b32 b0, $1, 0x0F0F0F0F;
shr.b32 t, $1, 4;
and.b32 b1, t, 0x0F0F0F0F;
dp4a.u32.s32 sh, b0, $2, z;
dp4a.u32.s32 sh, b1, $3, sh;
dp4a.u32.s32 sl, b0, $4, z;
dp4a.u32.s32 sl, b1, $5, sl;
shl.b32 sh, sh, 8;
add.s32 $0, sh, sl;
}""")
# Q2_K code word of 16 2-bit codes (weight j at bit 2j): byte lane j of bi is weight i + 4j.
_U2_DOT = tl.constexpr("""{
.reg .b32 b0, b1, b2, b3, t, sh, sl, z;
mov.b32 z, 0;
and.b32 b0, $1, 0x03030303;
shr.b32 t, $1, 2;
and.b32 b1, t, 0x03030303;
shr.b32 t, $1, 4;
and.b32 b2, t, 0x03030303;
shr.b32 t, $1, 6;
and.b32 b3, t, 0x03030303;
dp4a.u32.s32 sh, b0, $2, z;
dp4a.u32.s32 sh, b1, $3, sh;
dp4a.u32.s32 sh, b2, $4, sh;
dp4a.u32.s32 sh, b3, $5, sh;
dp4a.u32.s32 sl, b0, $6, z;
dp4a.u32.s32 sl, b1, $7, sl;
dp4a.u32.s32 sl, b2, $8, sl;
dp4a.u32.s32 sl, b3, $9, sl;
shl.b32 sh, sh, 8;
add.s32 $0, sh, sl;
}""")
# Q8_0 code word of four int8 codes.
_I8_DOT = tl.constexpr("""{
.reg .b32 sh, sl, z;
mov.b32 z, 0;
dp4a.s32.s32 sh, $1, $2, z;
dp4a.s32.s32 sl, $1, $3, z;
shl.b32 sh, sh, 8;
add.s32 $0, sh, sl;
}""")


# --------------------------------------------------------------------------- plain-tl twins
@triton.jit
def _sbyte(w, j: tl.constexpr):
    """Signed byte j of int32 words."""
    return (w << (24 - 8 * j)) >> 24


@triton.jit
def _iq2_val(nib):
    """Signed grid value (8, 25, 43, 60 by c = nib & 3, negative when nib & 4) of IQ2_XXS nibbles."""
    c = nib & 3
    mag = 8 + 17 * c + (c >> 1)
    return tl.where((nib & 4) != 0, -mag, mag)


@triton.jit
def _iq2_dot_tl(c, h0, h1, l0, l1):
    sh = tl.zeros_like(c)
    sl = tl.zeros_like(c)
    for j in tl.static_range(4):
        v0 = _iq2_val((c >> (4 * j)) & 15)
        v1 = _iq2_val((c >> (4 * j + 16)) & 15)
        sh += v0 * _sbyte(h0, j) + v1 * _sbyte(h1, j)
        sl += v0 * _sbyte(l0, j) + v1 * _sbyte(l1, j)
    return sh * 256 + sl


@triton.jit
def _u4_dot_tl(c, h0, h1, l0, l1):
    sh = tl.zeros_like(c)
    sl = tl.zeros_like(c)
    for j in tl.static_range(4):
        v0 = (c >> (8 * j)) & 15
        v1 = (c >> (8 * j + 4)) & 15
        sh += v0 * _sbyte(h0, j) + v1 * _sbyte(h1, j)
        sl += v0 * _sbyte(l0, j) + v1 * _sbyte(l1, j)
    return sh * 256 + sl


@triton.jit
def _u2_dot_tl(c, h0, h1, h2, h3, l0, l1, l2, l3):
    sh = tl.zeros_like(c)
    sl = tl.zeros_like(c)
    for j in tl.static_range(4):
        v0 = (c >> (8 * j)) & 3
        v1 = (c >> (8 * j + 2)) & 3
        v2 = (c >> (8 * j + 4)) & 3
        v3 = (c >> (8 * j + 6)) & 3
        sh += v0 * _sbyte(h0, j) + v1 * _sbyte(h1, j) + v2 * _sbyte(h2, j) + v3 * _sbyte(h3, j)
        sl += v0 * _sbyte(l0, j) + v1 * _sbyte(l1, j) + v2 * _sbyte(l2, j) + v3 * _sbyte(l3, j)
    return sh * 256 + sl


@triton.jit
def _i8_dot_tl(c, h, lo):
    sh = tl.zeros_like(c)
    sl = tl.zeros_like(c)
    for j in tl.static_range(4):
        v = _sbyte(c, j)
        sh += v * _sbyte(h, j)
        sl += v * _sbyte(lo, j)
    return sh * 256 + sl


# --------------------------------------------------------------------------- one code word per element
@triton.jit
def _dot4(c, h0, h1, l0, l1, FORM: tl.constexpr, ASM: tl.constexpr):
    """int32 sum of 8 weights (IQ2_XXS, Q4_K code words) times their activations a = 256*qh + ql."""
    if ASM:
        s = tl.inline_asm_elementwise(asm=_IQ2_DOT if FORM != 12 else _U4_DOT, constraints="=r,r,r,r,r,r",
                                      args=[c, h0, h1, l0, l1], dtype=tl.int32, is_pure=True, pack=1)
    elif FORM == 12:
        s = _u4_dot_tl(c, h0, h1, l0, l1)
    else:
        s = _iq2_dot_tl(c, h0, h1, l0, l1)
    return s


@triton.jit
def _bcast(a, BN: tl.constexpr, G: tl.constexpr, W: tl.constexpr):
    return tl.broadcast_to(a, (BN, G, W))


# --------------------------------------------------------------------------- loads
@triton.jit
def load_qact(qa_row, qs_row, qsum_row, k0, BK: tl.constexpr):
    """The activations of K step k0: words int32 [G, 16], dx/256 f32 [G], sums int32 [G, 2] (per 16)."""
    g = tl.arange(0, BK // 32)
    words = tl.load(qa_row + (k0 // 32 + g)[:, None] * 16 + tl.arange(0, 16)[None, :])
    dxs = tl.load(qs_row + k0 // 32 + g)
    sums = tl.load(qsum_row + (k0 // 16 + 2 * g)[:, None] + tl.arange(0, 2)[None, :])
    return words, dxs, sums


@triton.jit
def _split4(t, A: tl.constexpr, B: tl.constexpr):
    """[1, A, B, 4] -> its four slices [1, A, B] (index 0, 1, 2, 3) along the last axis."""
    a, b = tl.split(tl.reshape(t, (1, A, B, 2, 2)))  # a: index 0, 2; b: 1, 3
    x0, x2 = tl.split(a)
    x1, x3 = tl.split(b)
    return x0, x1, x2, x3


@triton.jit
def qdot_tile(p0, p1, p2, tables_ptr, r, k0, K, words, dxs, sums, FORM: tl.constexpr, ASM: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr):
    """f32 [BN, G]: per row of ``r`` (int64 [BN], e*N + n) and group of 32 weights of K step k0, the
    dot product of the weights with the activations (``load_qact``). Q2_K reads its codes as int32
    words of 16 (p0 an int32 view); the other forms as kernels/decode.load_codes does. BK: any
    multiple of 32 (each group reads the scale of its own 256-block)."""
    G: tl.constexpr = BK // 32
    rr = r[:, None, None]
    a, b = load_scales(p1, p2, r, k0, K, FORM, BN, BK)
    if FORM != 8 and BK > 256:  # the per-256 scale of each group (a row's one otherwise: 7-12% faster)
        b = tl.load(p2 + rr * (K // 256) + (k0 + 32 * tl.arange(0, G)[None, :, None]) // 256)  # [BN, G, 1]
    if FORM == 10:  # Q2_K: [BN, G, 2] words of 16 codes, one per scale group
        v = tl.arange(0, 2)[None, None, :]
        c = tl.load(p0 + rr * (K // 16) + (k0 // 16 + 2 * tl.arange(0, G)[None, :, None] + v))
        w8 = tl.reshape(words, (1, G, 2, 8))
        hh, ll = tl.split(tl.permute(tl.reshape(w8, (1, G, 2, 2, 4)), (0, 1, 2, 4, 3)))  # [1, G, 2, 4] each
        h0, h1, h2, h3 = _split4(hh, G, 2)
        l0, l1, l2, l3 = _split4(ll, G, 2)
        if ASM:
            s = tl.inline_asm_elementwise(
                asm=_U2_DOT, constraints="=r,r,r,r,r,r,r,r,r,r",
                args=[c, _bcast(h0, BN, G, 2), _bcast(h1, BN, G, 2), _bcast(h2, BN, G, 2), _bcast(h3, BN, G, 2),
                      _bcast(l0, BN, G, 2), _bcast(l1, BN, G, 2), _bcast(l2, BN, G, 2), _bcast(l3, BN, G, 2)],
                dtype=tl.int32, is_pure=True, pack=1)
        else:
            s = _u2_dot_tl(c, h0, h1, h2, h3, l0, l1, l2, l3)
        # a: u8 sc | m << 4 per 16 [BN, 2G, 1]; b: i32 d | dmin << 16 [BN, 1, 1]
        d = b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = (b >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        a = tl.reshape(a.to(tl.int32), (BN, G, 2))
        sc = d * (a & 15).to(tl.float32)
        nm = dmin * (a >> 4).to(tl.float32) * -1.0
        y = tl.sum(sc * s.to(tl.float32) + nm * sums[None, :, :].to(tl.float32), axis=2)
    elif FORM == 8:  # Q8_0: [BN, G, 8] words of 4 codes; words of the NATURAL layout, 2 per code word
        g8 = 8 * tl.arange(0, G)[None, :, None]
        c = tl.load(p0 + rr * (K // 4) + (k0 // 4 + g8 + tl.arange(0, 8)[None, None, :]))
        # NATURAL per 8 weights: [H0, H1, L0, L1] -> per code word of 4: (H, L)
        t = tl.permute(tl.reshape(words, (1, G, 4, 2, 2)), (0, 1, 2, 4, 3))  # [1, G, 4 (w), 2 (i), 2 (level)]
        h, lo = tl.split(tl.reshape(t, (1, G, 8, 2)))
        h = _bcast(h, BN, G, 8)
        lo = _bcast(lo, BN, G, 8)
        if ASM:
            s = tl.inline_asm_elementwise(asm=_I8_DOT, constraints="=r,r,r,r", args=[c, h, lo], dtype=tl.int32,
                                          is_pure=True, pack=1)
        else:
            s = _i8_dot_tl(c, h, lo)
        y = tl.sum(s, axis=2).to(tl.float32) * tl.reshape(a, (BN, G)).to(tl.float32)
    else:  # IQ2_XXS fast / compact, Q4_K: [BN, G, 4] code words of 8 weights
        g4 = 4 * tl.arange(0, G)[None, :, None]
        c = tl.load(p0 + rr * (K // 8) + (k0 // 8 + g4 + tl.arange(0, 4)[None, None, :]))
        if FORM == 17:  # compact: grid index + sign word -> the fast form's code word
            vv = tl.arange(0, 4)[None, None, :]
            c = tl.load(tables_ptr + c.to(tl.int32)) | tl.load(tables_ptr + 256 + ((a >> (7 * vv)) & 127))
        h0, h1, l0, l1 = _split4(tl.reshape(words, (1, G, 4, 4)), G, 4)
        s = _dot4(c, _bcast(h0, BN, G, 4), _bcast(h1, BN, G, 4), _bcast(l0, BN, G, 4), _bcast(l1, BN, G, 4),
                  FORM, ASM)
        s = tl.sum(s, axis=2).to(tl.float32)  # [BN, G]
        if FORM == 12:  # a: i16 sc | m << 8 per 32 [BN, G, 1]; b: i32 d | dmin << 16
            d = b.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            dmin = (b >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            a = tl.reshape(a.to(tl.int32), (BN, G))
            sc = tl.reshape(d, (BN, d.shape[1])) * (a & 255).to(tl.float32)  # d: [BN, 1 or G, 1]
            nm = tl.reshape(dmin, (BN, d.shape[1])) * ((a >> 8) & 255).to(tl.float32) * -1.0
            y = sc * s + nm * tl.sum(sums, axis=1)[None, :].to(tl.float32)
        elif FORM == 16:  # a: u8 s(2i) | s(2i+1) << 4 [BN, G, 1]; b: f16 d [BN, 1, 1]
            g = tl.arange(0, G)[None, :, None]
            sc8 = (2 * ((a.to(tl.int32) >> (4 * (g % 2))) & 15) + 1).to(tl.float32) * 0.125
            y = s * tl.reshape(sc8 * b.to(tl.float32), (BN, G))  # b: [BN, 1 or G, 1]
        else:  # compact: a: i32 GGUF sign word [BN, G, 1]; b: f16 d
            sc8 = (2 * ((a >> 28) & 15) + 1).to(tl.float32) * 0.125
            y = s * tl.reshape(sc8 * b.to(tl.float32), (BN, G))
    return y * dxs[None, :]
