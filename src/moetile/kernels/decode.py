"""In-kernel decoding of packed weight tiles (moetile.quant.pack forms), no policy.

``weight_tile(..., F16=True)`` returns f16 [BN, BK]: the weights k0..k0+BK-1 of the rows ``r``
(int64 [BN], row index e*N + n into the planes) rounded to f16 exactly as ``f16(qt.dequantize())``
rounds them, for the tensor-core kernels; ``F16=False`` returns the exact float32 weights (mat-vec).

Tiles are 3-D, [BN, G, W]: G scale groups of the step, W code words per group (a word holds 8
weights, 4 for Q8_0, in K order), so each scale is loaded once per (row, group) in the layout
that uses it and the codes with 8- or 16-byte vectors.

Each f16 decoder exists twice: ``ASM=True`` decodes several weights per instruction through
``tl.inline_asm_elementwise`` (GPU only: the interpreter cannot run PTX), ``ASM=False`` is its
plain-``tl`` twin. The two give the same bits; CI runs the twin, a GPU test compares the pair.

Why the results are exact:
* Q4_K, Q2_K: w = (d*sc)*q - dmin*m in float32 (the product is exact, one rounding on the
  subtraction, as gguf), then one rounding to f16.
* IQ2_XXS: g = ±grid*(2s+1)/8 is exact in f16 (<= 11 bits); g*d is one f16 rounding of the exact
  float32 value db*grid*sign.
* Q8_0: q*d is one f16 rounding of the exact float32 product.
"""

import triton
import triton.language as tl

# Form ids (constexpr FORM of the kernels).
Q8_0 = tl.constexpr(8)
Q2_K = tl.constexpr(10)
Q4_K = tl.constexpr(12)
IQ2_FAST = tl.constexpr(16)
IQ2_COMPACT = tl.constexpr(17)


# --------------------------------------------------------------------------- PTX decoders (one word per call)
@triton.jit
def _asm_u4_word(c, s, nm):
    """i32 word of eight 4-bit codes (nibble j = weight j) to eight f16 RN((s*q) + nm), f32 math:
    each nibble is OR-ed into the mantissa of a power of two whose unit is 1, one sub gives q."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 w, t0, t1, t2, t3, t4, t5, t6, t7;
        shr.b32 w, $8, 16;
        lop3.b32 t0, $8, 0x0000000f, 0x4b000000, 0xea;
        lop3.b32 t1, $8, 0x000000f0, 0x49000000, 0xea;
        lop3.b32 t2, $8, 0x00000f00, 0x47000000, 0xea;
        lop3.b32 t3, $8, 0x0000f000, 0x45000000, 0xea;
        lop3.b32 t4, w, 0x0000000f, 0x4b000000, 0xea;
        lop3.b32 t5, w, 0x000000f0, 0x49000000, 0xea;
        lop3.b32 t6, w, 0x00000f00, 0x47000000, 0xea;
        lop3.b32 t7, w, 0x0000f000, 0x45000000, 0xea;
        sub.f32 t0, t0, 0f4B000000; sub.f32 t1, t1, 0f49000000;
        sub.f32 t2, t2, 0f47000000; sub.f32 t3, t3, 0f45000000;
        sub.f32 t4, t4, 0f4B000000; sub.f32 t5, t5, 0f49000000;
        sub.f32 t6, t6, 0f47000000; sub.f32 t7, t7, 0f45000000;
        fma.rn.f32 t0, t0, $9, $10; fma.rn.f32 t1, t1, $9, $10;
        fma.rn.f32 t2, t2, $9, $10; fma.rn.f32 t3, t3, $9, $10;
        fma.rn.f32 t4, t4, $9, $10; fma.rn.f32 t5, t5, $9, $10;
        fma.rn.f32 t6, t6, $9, $10; fma.rn.f32 t7, t7, $9, $10;
        cvt.rn.f16.f32 $0, t0; cvt.rn.f16.f32 $1, t1; cvt.rn.f16.f32 $2, t2; cvt.rn.f16.f32 $3, t3;
        cvt.rn.f16.f32 $4, t4; cvt.rn.f16.f32 $5, t5; cvt.rn.f16.f32 $6, t6; cvt.rn.f16.f32 $7, t7;
        }""",
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
        args=[c, s, nm], dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _asm_u2_half(c, s, nm):
    """i16 of eight 2-bit codes (bits 2j = weight j) to eight f16 RN((s*q) + nm), f32 math as above."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 w, t0, t1, t2, t3, t4, t5, t6, t7;
        cvt.u32.u16 w, $8;
        lop3.b32 t0, w, 0x00000003, 0x4b000000, 0xea;
        lop3.b32 t1, w, 0x0000000c, 0x4a000000, 0xea;
        lop3.b32 t2, w, 0x00000030, 0x49000000, 0xea;
        lop3.b32 t3, w, 0x000000c0, 0x48000000, 0xea;
        lop3.b32 t4, w, 0x00000300, 0x47000000, 0xea;
        lop3.b32 t5, w, 0x00000c00, 0x46000000, 0xea;
        lop3.b32 t6, w, 0x00003000, 0x45000000, 0xea;
        lop3.b32 t7, w, 0x0000c000, 0x44000000, 0xea;
        sub.f32 t0, t0, 0f4B000000; sub.f32 t1, t1, 0f4A000000;
        sub.f32 t2, t2, 0f49000000; sub.f32 t3, t3, 0f48000000;
        sub.f32 t4, t4, 0f47000000; sub.f32 t5, t5, 0f46000000;
        sub.f32 t6, t6, 0f45000000; sub.f32 t7, t7, 0f44000000;
        fma.rn.f32 t0, t0, $9, $10; fma.rn.f32 t1, t1, $9, $10;
        fma.rn.f32 t2, t2, $9, $10; fma.rn.f32 t3, t3, $9, $10;
        fma.rn.f32 t4, t4, $9, $10; fma.rn.f32 t5, t5, $9, $10;
        fma.rn.f32 t6, t6, $9, $10; fma.rn.f32 t7, t7, $9, $10;
        cvt.rn.f16.f32 $0, t0; cvt.rn.f16.f32 $1, t1; cvt.rn.f16.f32 $2, t2; cvt.rn.f16.f32 $3, t3;
        cvt.rn.f16.f32 $4, t4; cvt.rn.f16.f32 $5, t5; cvt.rn.f16.f32 $6, t6; cvt.rn.f16.f32 $7, t7;
        }""",
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,h,r,r",
        args=[c, s, nm], dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _asm_iq2_word(sel, sc8, d):
    """i32 word of eight IQ2_XXS codes (nibble j = c | neg << 2 of weight j) to eight f16
    (±grid * sc8) * d: two byte-permute lookups give the f16 bytes of ±8/25/43; the first product
    is exact (<= 11 bits), the second rounds once."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 la, ha, lb, hb, w, TL, TH0, TH1, r0, r1, r2, r3, s2, d2;
        mov.b32 TL, 0x00604000;
        mov.b32 TH0, 0x00514E48;
        mov.b32 TH1, 0x00D1CEC8;
        mov.b32 s2, {$9, $9};
        mov.b32 d2, {$10, $10};
        prmt.b32 la, TL, TL, $8;
        prmt.b32 ha, TH0, TH1, $8;
        shr.b32 w, $8, 16;
        prmt.b32 lb, TL, TL, w;
        prmt.b32 hb, TH0, TH1, w;
        prmt.b32 r0, la, ha, 0x5140;
        prmt.b32 r1, la, ha, 0x7362;
        prmt.b32 r2, lb, hb, 0x5140;
        prmt.b32 r3, lb, hb, 0x7362;
        mul.rn.f16x2 r0, r0, s2;
        mul.rn.f16x2 r1, r1, s2;
        mul.rn.f16x2 r2, r2, s2;
        mul.rn.f16x2 r3, r3, s2;
        mul.rn.f16x2 r0, r0, d2;
        mul.rn.f16x2 r1, r1, d2;
        mul.rn.f16x2 r2, r2, d2;
        mul.rn.f16x2 r3, r3, d2;
        mov.b32 {$0, $1}, r0;
        mov.b32 {$2, $3}, r1;
        mov.b32 {$4, $5}, r2;
        mov.b32 {$6, $7}, r3;
        }""",
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
        args=[sel, sc8, d], dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _asm_i8_word(c, d):
    """i32 word of four int8 codes to four f16 RN(q * d): q + 128 becomes the low byte of f16
    1024 + 128 + q, one sub gives q exactly."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, r0, r1, H, B, d2;
        mov.b32 H, 0x64646464;
        mov.b32 B, 0x64806480;
        mov.b32 d2, {$5, $5};
        xor.b32 t, $4, 0x80808080;
        prmt.b32 r0, t, H, 0x4140;
        prmt.b32 r1, t, H, 0x4342;
        sub.f16x2 r0, r0, B;
        sub.f16x2 r1, r1, B;
        mul.rn.f16x2 r0, r0, d2;
        mul.rn.f16x2 r1, r1, d2;
        mov.b32 {$0, $1}, r0;
        mov.b32 {$2, $3}, r1;
        }""",
        constraints="=h,=h,=h,=h,r,h",
        args=[c, d], dtype=(tl.float16,) * 4, is_pure=True, pack=1)


# --------------------------------------------------------------------------- plain-tl twins
@triton.jit
def _fields(c, BITS: tl.constexpr, NF: tl.constexpr):
    """[BN, G, W] integer words -> [BN, G, W, NF] unsigned fields of BITS bits (field j at bit BITS*j)."""
    j = tl.arange(0, NF)
    return (c.to(tl.int32)[:, :, :, None] >> (BITS * j)[None, None, None, :]) & ((1 << BITS) - 1)


@triton.jit
def _iq2_value(code, sc8, d):
    """f32 (±grid * sc8) * d of IQ2_XXS 4-bit codes c | neg << 2 (exact in f32, 22 bits at most)."""
    c = code & 3
    mag = (8 + 17 * c + (c >> 1)).to(tl.float32)  # 8, 25, 43
    g = tl.where((code & 4) != 0, -mag, mag)
    return g * sc8 * d


@triton.jit
def _join8(w0, w1, w2, w3, w4, w5, w6, w7):
    """Eight [BN, G, W] tensors (weight j of each word) -> [BN, G, W, 8] in K order."""
    return tl.join(tl.join(tl.join(w0, w1), tl.join(w2, w3)), tl.join(tl.join(w4, w5), tl.join(w6, w7)))


# --------------------------------------------------------------------------- per-form tiles
@triton.jit
def _rows3(r):
    return r[:, None, None]


@triton.jit
def _q4_k(codes_ptr, scales_ptr, dd_ptr, r, k0, K, F16: tl.constexpr, ASM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr):
    # codes: i32 words [K/8] per row; scales u8 [K/32, 2] (sc, m); dd f16 [K/256, 2] (d, dmin)
    G: tl.constexpr = BK // 32
    g = tl.arange(0, G)[None, :, None]
    c = tl.load(codes_ptr + _rows3(r) * (K // 8) + (k0 // 8 + 4 * g) + tl.arange(0, 4)[None, None, :])
    dp = dd_ptr + _rows3(r) * (K // 128) + (k0 // 256) * 2  # [BN, 1, 1]
    sp = scales_ptr + _rows3(r) * (K // 16) + (k0 // 16 + 2 * g)  # [BN, G, 1]
    s = tl.load(dp).to(tl.float32) * tl.load(sp).to(tl.float32)  # d*sc, exact
    nm = -(tl.load(dp + 1).to(tl.float32) * tl.load(sp + 1).to(tl.float32))  # -dmin*m, exact
    if F16 and ASM:
        sb, nb = tl.broadcast_to(s, (BN, G, 4)), tl.broadcast_to(nm, (BN, G, 4))
        w0, w1, w2, w3, w4, w5, w6, w7 = _asm_u4_word(c, sb, nb)
        w = _join8(w0, w1, w2, w3, w4, w5, w6, w7)
    else:
        w = s[:, :, :, None] * _fields(c, 4, 8).to(tl.float32) + nm[:, :, :, None]
        if F16:
            w = w.to(tl.float16)
    return w.reshape(BN, BK)


@triton.jit
def _q2_k(codes_ptr, scales_ptr, dd_ptr, r, k0, K, F16: tl.constexpr, ASM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr):
    # codes: i16 [K/8] per row (8 weights each); scales u8 [K/16]: sc | m << 4; dd f16 [K/256, 2]
    G: tl.constexpr = BK // 16
    g = tl.arange(0, G)[None, :, None]
    c = tl.load(codes_ptr + _rows3(r) * (K // 8) + (k0 // 8 + 2 * g) + tl.arange(0, 2)[None, None, :])
    dp = dd_ptr + _rows3(r) * (K // 128) + (k0 // 256) * 2
    sm = tl.load(scales_ptr + _rows3(r) * (K // 16) + (k0 // 16 + g)).to(tl.int32)  # [BN, G, 1]
    s = tl.load(dp).to(tl.float32) * (sm & 15).to(tl.float32)
    nm = -(tl.load(dp + 1).to(tl.float32) * (sm >> 4).to(tl.float32))
    if F16 and ASM:
        sb, nb = tl.broadcast_to(s, (BN, G, 2)), tl.broadcast_to(nm, (BN, G, 2))
        w0, w1, w2, w3, w4, w5, w6, w7 = _asm_u2_half(c, sb, nb)
        w = _join8(w0, w1, w2, w3, w4, w5, w6, w7)
    else:
        w = s[:, :, :, None] * _fields(c, 2, 8).to(tl.float32) + nm[:, :, :, None]
        if F16:
            w = w.to(tl.float16)
    return w.reshape(BN, BK)


@triton.jit
def _iq2_words(sel, sc8, d, F16: tl.constexpr, ASM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Weights of IQ2_XXS code words sel i32 [BN, G, 4] with (2s+1)/8 sc8 [BN, G, 1] and d [BN, 1, 1] (f32)."""
    G: tl.constexpr = BK // 32
    if F16 and ASM:
        sb = tl.broadcast_to(sc8.to(tl.float16), (BN, G, 4))
        db = tl.broadcast_to(d.to(tl.float16), (BN, G, 4))
        w0, w1, w2, w3, w4, w5, w6, w7 = _asm_iq2_word(sel, sb, db)
        w = _join8(w0, w1, w2, w3, w4, w5, w6, w7)
    else:
        w = _iq2_value(_fields(sel, 4, 8), sc8[:, :, :, None], d[:, :, :, None])
        if F16:
            w = w.to(tl.float16)
    return w.reshape(BN, BK)


@triton.jit
def _iq2_fast(codes_ptr, scales_ptr, d_ptr, r, k0, K, F16: tl.constexpr, ASM: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr):
    # codes: i32 words [K/8] per row (nibble c | neg << 2); scales u8 [K/64]: s(2i) | s(2i+1) << 4; d f16 [K/256]
    G: tl.constexpr = BK // 32
    g = tl.arange(0, G)[None, :, None]
    c = tl.load(codes_ptr + _rows3(r) * (K // 8) + (k0 // 8 + 4 * g) + tl.arange(0, 4)[None, None, :])
    sb = tl.load(scales_ptr + _rows3(r) * (K // 64) + (k0 // 64 + g // 2)).to(tl.int32)  # [BN, G, 1]
    sc8 = (2 * ((sb >> (4 * (g % 2))) & 15) + 1).to(tl.float32) * 0.125  # (2s+1)/8, exact
    d = tl.load(d_ptr + _rows3(r) * (K // 256) + k0 // 256).to(tl.float32)  # [BN, 1, 1]
    return _iq2_words(c, sc8, d, F16, ASM, BN, BK)


@triton.jit
def _iq2_compact(grid_ptr, signs_ptr, d_ptr, tables_ptr, r, k0, K, F16: tl.constexpr, ASM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    # grid u8 [K/8] per row; signs i32 [K/32] (GGUF's word); d f16 [K/256]. tables_ptr: int32 [384]:
    # 256 grid words (nibble j = class c of grid value j), then 128 sign words (bit 4j+2 = sign of
    # weight j, the parity bit included): one OR of two lookups gives the fast form's code word.
    G: tl.constexpr = BK // 32
    g = tl.arange(0, G)[None, :, None]
    v = tl.arange(0, 4)[None, None, :]
    gidx = tl.load(grid_ptr + _rows3(r) * (K // 8) + (k0 // 8 + 4 * g) + v).to(tl.int32)  # [BN, G, 4]
    word = tl.load(signs_ptr + _rows3(r) * (K // 32) + (k0 // 32 + g))  # [BN, G, 1]
    sel = tl.load(tables_ptr + gidx) | tl.load(tables_ptr + 256 + ((word >> (7 * v)) & 127))
    sc8 = (2 * ((word >> 28) & 15) + 1).to(tl.float32) * 0.125
    d = tl.load(d_ptr + _rows3(r) * (K // 256) + k0 // 256).to(tl.float32)
    return _iq2_words(sel, sc8, d, F16, ASM, BN, BK)


@triton.jit
def _q8_0(codes_ptr, d_ptr, r, k0, K, F16: tl.constexpr, ASM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # codes: i32 words [K/4] per row (four int8 each); d f16 [K/32]
    G: tl.constexpr = BK // 32
    g = tl.arange(0, G)[None, :, None]
    c = tl.load(codes_ptr + _rows3(r) * (K // 4) + (k0 // 4 + 8 * g) + tl.arange(0, 8)[None, None, :])
    d = tl.load(d_ptr + _rows3(r) * (K // 32) + (k0 // 32 + g))  # f16 [BN, G, 1]
    if F16 and ASM:
        o0, o1, o2, o3 = _asm_i8_word(c, tl.broadcast_to(d, (BN, G, 8)))
        w = tl.join(tl.join(o0, o1), tl.join(o2, o3))
    else:
        q = (_fields(c, 8, 4) ^ 128) - 128  # signed bytes
        w = q.to(tl.float32) * d.to(tl.float32)[:, :, :, None]
        if F16:
            w = w.to(tl.float16)
    return w.reshape(BN, BK)


@triton.jit
def weight_tile(p0, p1, p2, tables_ptr, r, k0, K, FORM: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    """Weights k0..k0+BK-1 of rows ``r`` (int64 [BN]): f16 [BN, BK] rounded as f16(dequantize())
    when F16, else the exact float32 values. p0..p2: the form's planes in moetile.quant.pack order,
    code planes viewed as words (see ops/_launch.kernel_planes)."""
    if FORM == 12:
        w = _q4_k(p0, p1, p2, r, k0, K, F16, ASM, BN, BK)
    elif FORM == 10:
        w = _q2_k(p0, p1, p2, r, k0, K, F16, ASM, BN, BK)
    elif FORM == 16:
        w = _iq2_fast(p0, p1, p2, r, k0, K, F16, ASM, BN, BK)
    elif FORM == 17:
        w = _iq2_compact(p0, p1, p2, tables_ptr, r, k0, K, F16, ASM, BN, BK)
    else:
        w = _q8_0(p0, p1, r, k0, K, F16, ASM, BN, BK)
    return w
