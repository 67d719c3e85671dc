"""In-kernel decoding of packed weight tiles (moetile.quant.pack forms), no policy.

A weight tile is read in steps so a kernel can prefetch the scales of the next K step into
registers while it decodes this one (the codes are pipelined through shared memory by Triton):
``load_codes`` and ``load_scales`` issue the loads of the weights k0..k0+BK-1 of the rows ``r``
(int64 [BN], row index e*N + n into the planes); ``decode_raw(..., F16=True)`` turns them into
f16 [BN, BK] rounded exactly as
``f16(qt.dequantize())`` rounds them (tensor-core kernels), ``F16=False`` into the exact float32
weights (mat-vec). ``weight_tile`` does both.

Raw tiles are 3-D, [BN, G, W]: G scale groups of the step, W code words per group (a word holds 8
weights, 4 for Q8_0, in K order), so each scale is loaded once per (row, group) in the layout that
uses it and the codes with 8- or 16-byte vectors. The planes come in word views
(ops/_launch.kernel_planes): Q4_K (codes i32, scales i16 = sc | m << 8, dd i32 = d | dmin << 16),
Q2_K (codes i16, scales u8, dd i32), IQ2_XXS fast (codes i32, scales u8, d f16), IQ2_XXS compact
(grid u8, signs i32, d f16), Q8_0 (codes i32, d f16).

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
def _affine_ptx(bits: int, f32: bool) -> str:
    """PTX of a K-quant word decoder: 8 codes of ``bits`` bits (input $8: an i32 word of nibbles or
    an i16 of 2-bit fields, weight j at bit bits*j), $9 = d*sc, $10 = -dmin*m (f32) -> $0..$7 =
    (d*sc)*q - dmin*m in f32 (one rounding, as gguf), stored as f32 or rounded once to f16. Each
    code is OR-ed into the mantissa of a power of two whose unit is 1 (mask and exponent are
    immediates of one lop3), and one sub of that power gives q."""
    lines = ["{", ".reg .b32 w, t0, t1, t2, t3, t4, t5, t6, t7;"]
    lines.append("shr.b32 w, $8, 16;" if bits == 4 else "cvt.u32.u16 w, $8;")
    for j in range(8):
        src = ("$8" if j < 4 else "w") if bits == 4 else "w"
        pos = bits * (j % 4) if bits == 4 else bits * j
        expo = (150 - pos) << 23
        mask = ((1 << bits) - 1) << pos
        lines.append(f"lop3.b32 t{j}, {src}, 0x{mask:08x}, 0x{expo:08x}, 0xea;")
        lines.append(f"sub.f32 t{j}, t{j}, 0f{expo:08X};")
        lines.append(f"fma.rn.f32 t{j}, t{j}, $9, $10;")
    for j in range(8):
        lines.append(f"mov.b32 ${j}, t{j};" if f32 else f"cvt.rn.f16.f32 ${j}, t{j};")
    return "\n".join(lines + ["}"])


_U4_F16 = tl.constexpr(_affine_ptx(4, False))
_U4_F32 = tl.constexpr(_affine_ptx(4, True))
_U2_F16 = tl.constexpr(_affine_ptx(2, False))
_U2_F32 = tl.constexpr(_affine_ptx(2, True))


@triton.jit
def _asm_affine(c, s, nm, BITS: tl.constexpr, F16: tl.constexpr):
    """The K-quant word decoders (``_affine_ptx``): eight outputs, weight j of each word. (One return:
    Triton checks the types of every return, taken branch or not.)"""
    if BITS == 4:
        if F16:
            w = tl.inline_asm_elementwise(asm=_U4_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
                                          args=[c, s, nm], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        else:
            w = tl.inline_asm_elementwise(asm=_U4_F32, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r",
                                          args=[c, s, nm], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        if F16:
            w = tl.inline_asm_elementwise(asm=_U2_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,h,r,r",
                                          args=[c, s, nm], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        else:
            w = tl.inline_asm_elementwise(asm=_U2_F32, constraints="=r,=r,=r,=r,=r,=r,=r,=r,h,r,r",
                                          args=[c, s, nm], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    return w


# The IQ2_XXS lookup: two byte permutes per half of the word $8 turn its four 3-bit codes
# (c | neg << 2) into the low and high bytes of ±8/25/43 in f16 (tables TL, TH0, TH1); two more
# pair them as f16x2 r0..r3 (weights 0-1, 2-3, 4-5, 6-7).
_IQ2_TABLES = """mov.b32 TL, 0x00604000;
mov.b32 TH0, 0x00514E48;
mov.b32 TH1, 0x00D1CEC8;
"""
_IQ2_LOOKUP = """prmt.b32 la, TL, TL, $8;
prmt.b32 ha, TH0, TH1, $8;
shr.b32 w, $8, 16;
prmt.b32 lb, TL, TL, w;
prmt.b32 hb, TH0, TH1, w;
prmt.b32 r0, la, ha, 0x5140;
prmt.b32 r1, la, ha, 0x7362;
prmt.b32 r2, lb, hb, 0x5140;
prmt.b32 r3, lb, hb, 0x7362;
"""
# Q8_0: q + 128 as the low byte of f16 1024 + 128 + q, then one sub gives q exactly in r0, r1.
_I8_CONSTANTS = """mov.b32 H, 0x64646464;
mov.b32 B, 0x64806480;
"""
_I8_EXACT = """xor.b32 t, $4, 0x80808080;
prmt.b32 r0, t, H, 0x4140;
prmt.b32 r1, t, H, 0x4342;
sub.f16x2 r0, r0, B;
sub.f16x2 r1, r1, B;
"""
_IQ2_F16 = tl.constexpr(
    "{\n.reg .b32 la, ha, lb, hb, w, TL, TH0, TH1, r0, r1, r2, r3, s2, d2;\n" + _IQ2_TABLES
    + "mov.b32 s2, {$9, $9};\nmov.b32 d2, {$10, $10};\n" + _IQ2_LOOKUP
    + "".join(f"mul.rn.f16x2 r{i}, r{i}, s2;\n" for i in range(4))
    + "".join(f"mul.rn.f16x2 r{i}, r{i}, d2;\n" for i in range(4))
    + "".join(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, r{i};\n" for i in range(4)) + "}")
_IQ2_F32 = tl.constexpr(
    "{\n.reg .b32 la, ha, lb, hb, w, TL, TH0, TH1, r0, r1, r2, r3;\n.reg .b16 h0, h1, h2, h3, h4, h5, h6, h7;\n"
    + _IQ2_TABLES + _IQ2_LOOKUP + "".join(f"mov.b32 {{h{2 * i}, h{2 * i + 1}}}, r{i};\n" for i in range(4))
    + "".join(f"cvt.f32.f16 ${j}, h{j};\n" for j in range(8))
    + "".join(f"mul.rn.f32 ${j}, ${j}, $9;\n" for j in range(8)) + "}")
_I8_F16 = tl.constexpr(
    "{\n.reg .b32 t, r0, r1, H, B, d2;\n" + _I8_CONSTANTS + "mov.b32 d2, {$5, $5};\n" + _I8_EXACT
    + "mul.rn.f16x2 r0, r0, d2;\nmul.rn.f16x2 r1, r1, d2;\nmov.b32 {$0, $1}, r0;\nmov.b32 {$2, $3}, r1;\n}")
_I8_F32 = tl.constexpr(
    "{\n.reg .b32 t, r0, r1, H, B;\n.reg .b16 h0, h1, h2, h3;\n" + _I8_CONSTANTS + _I8_EXACT
    + "mov.b32 {h0, h1}, r0;\nmov.b32 {h2, h3}, r1;\n"
    + "".join(f"cvt.f32.f16 ${j}, h{j};\n" for j in range(4))
    + "".join(f"mul.rn.f32 ${j}, ${j}, $5;\n" for j in range(4)) + "}")


@triton.jit
def _asm_iq2_word(sel, sc8, d):
    """i32 word of eight IQ2_XXS codes (nibble j = c | neg << 2 of weight j) to eight f16
    (±grid * sc8) * d: the lookup above; the first product is exact (<= 11 bits), the second
    rounds once."""
    return tl.inline_asm_elementwise(asm=_IQ2_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                                     args=[sel, sc8, d], dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _asm_i8_word(c, d):
    """i32 word of four int8 codes to four f16 RN(q * d)."""
    return tl.inline_asm_elementwise(asm=_I8_F16, constraints="=h,=h,=h,=h,r,h",
                                     args=[c, d], dtype=(tl.float16,) * 4, is_pure=True, pack=1)


@triton.jit
def _asm_iq2_word_f32(sel, scd):
    """As _asm_iq2_word, to float32: the f16 lookups widened exactly, times scd = (2s+1)/8 * d
    (f32, exact): one exact product (<= 22 bits)."""
    return tl.inline_asm_elementwise(asm=_IQ2_F32, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r",
                                     args=[sel, scd], dtype=(tl.float32,) * 8, is_pure=True, pack=1)


@triton.jit
def _asm_i8_word_f32(c, d):
    """int32 word of four int8 codes to four f32 q * d (exact): q exact in f16, widened, times d."""
    return tl.inline_asm_elementwise(asm=_I8_F32, constraints="=r,=r,=r,=r,r,r",
                                     args=[c, d], dtype=(tl.float32,) * 4, is_pure=True, pack=1)


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
def join8(w0, w1, w2, w3, w4, w5, w6, w7):
    """Eight [BN, G, W] tensors (weight j of each word) -> [BN, G, W, 8] in K order. tl.join appends
    its new axis last, so the finest pairing (even, odd) is the outermost join."""
    return tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))


@triton.jit
def join4(w0, w1, w2, w3):
    """Four [BN, G, W] tensors (weight j of each word) -> [BN, G, W, 4] in K order."""
    return tl.join(tl.join(w0, w2), tl.join(w1, w3))


@triton.jit
def _lo16_f16(v):
    """The low 16 bits of an i32 tensor as f16 (bit copy)."""
    return v.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _rows3(r):
    return r[:, None, None]


# --------------------------------------------------------------------------- raw loads per form
@triton.jit
def load_codes(p0, r, k0, K, FORM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The code words of K step k0 of rows ``r``: [BN, G, W] in each form's word view."""
    rr = _rows3(r)
    if FORM == 10:  # Q2_K: groups of 16 = 2 half-words
        g = tl.arange(0, BK // 16)[None, :, None]
        c = tl.load(p0 + rr * (K // 8) + (k0 // 8 + 2 * g) + tl.arange(0, 2)[None, None, :])
    elif FORM == 8:  # Q8_0: groups of 32 = 8 words
        g = tl.arange(0, BK // 32)[None, :, None]
        c = tl.load(p0 + rr * (K // 4) + (k0 // 4 + 8 * g) + tl.arange(0, 8)[None, None, :])
    else:  # Q4_K, IQ2_XXS fast (i32 words), IQ2_XXS compact (u8 grid indices): groups of 32 = 4
        g = tl.arange(0, BK // 32)[None, :, None]
        c = tl.load(p0 + rr * (K // 8) + (k0 // 8 + 4 * g) + tl.arange(0, 4)[None, None, :])
    return c


@triton.jit
def load_scales(p1, p2, r, k0, K, FORM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The scales of K step k0 of rows ``r``: (per group [BN, G, 1], per row [BN, 1, 1])."""
    rr = _rows3(r)
    if FORM == 12:  # Q4_K: i16 sc | m << 8 per 32, i32 d | dmin << 16 per 256
        g = tl.arange(0, BK // 32)[None, :, None]
        a = tl.load(p1 + rr * (K // 32) + (k0 // 32 + g))
        b = tl.load(p2 + rr * (K // 256) + k0 // 256)
    elif FORM == 10:  # Q2_K: u8 sc | m << 4 per 16, i32 d | dmin << 16 per 256
        g = tl.arange(0, BK // 16)[None, :, None]
        a = tl.load(p1 + rr * (K // 16) + (k0 // 16 + g))
        b = tl.load(p2 + rr * (K // 256) + k0 // 256)
    elif FORM == 16:  # IQ2_XXS fast: u8 holding s of two groups, f16 d per 256
        g = tl.arange(0, BK // 32)[None, :, None]
        a = tl.load(p1 + rr * (K // 64) + (k0 // 64 + g // 2))
        b = tl.load(p2 + rr * (K // 256) + k0 // 256)
    elif FORM == 17:  # IQ2_XXS compact: i32 GGUF sign word per 32, f16 d per 256
        g = tl.arange(0, BK // 32)[None, :, None]
        a = tl.load(p1 + rr * (K // 32) + (k0 // 32 + g))
        b = tl.load(p2 + rr * (K // 256) + k0 // 256)
    else:  # Q8_0: f16 d per 32
        g = tl.arange(0, BK // 32)[None, :, None]
        a = tl.load(p1 + rr * (K // 32) + (k0 // 32 + g))
        b = a
    return a, b


# --------------------------------------------------------------------------- decode per form
@triton.jit
def _affine(c, s, nm, BITS: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr, BN: tl.constexpr,
            G: tl.constexpr, W: tl.constexpr):
    """K-quant weights s*q + nm (s = d*sc, nm = -dmin*m, f32 [BN, G, 1]) of the BITS-bit codes c
    [BN, G, W]: [BN, G, W, 8], f16 or f32."""
    if ASM:
        sb, nb = tl.broadcast_to(s, (BN, G, W)), tl.broadcast_to(nm, (BN, G, W))
        w0, w1, w2, w3, w4, w5, w6, w7 = _asm_affine(c, sb, nb, BITS, F16)
        w = join8(w0, w1, w2, w3, w4, w5, w6, w7)
    else:
        w = s[:, :, :, None] * _fields(c, BITS, 8).to(tl.float32) + nm[:, :, :, None]
        if F16:
            w = w.to(tl.float16)
    return w


@triton.jit
def _iq2_words(sel, sc8, d, F16: tl.constexpr, ASM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr):
    """Weights [BN, G, 4, 8] of IQ2_XXS code words sel i32 [BN, G, 4], (2s+1)/8 sc8 [BN, G, 1] and
    d [BN, 1, 1] (f32)."""
    if F16 and ASM:
        sb = tl.broadcast_to(sc8.to(tl.float16), (BN, G, 4))
        db = tl.broadcast_to(d.to(tl.float16), (BN, G, 4))
        w0, w1, w2, w3, w4, w5, w6, w7 = _asm_iq2_word(sel, sb, db)
        w = join8(w0, w1, w2, w3, w4, w5, w6, w7)
    elif ASM:
        w0, w1, w2, w3, w4, w5, w6, w7 = _asm_iq2_word_f32(sel, tl.broadcast_to(sc8 * d, (BN, G, 4)))
        w = join8(w0, w1, w2, w3, w4, w5, w6, w7)
    else:
        w = _iq2_value(_fields(sel, 4, 8), sc8[:, :, :, None], d[:, :, :, None])
        if F16:
            w = w.to(tl.float16)
    return w


@triton.jit
def decode_raw(c, a, b, tables_ptr, FORM: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    """Weights [BN, BK] of one K step from ``load_codes`` and ``load_scales``: f16 rounded as f16(dequantize())
    when F16, else the exact float32 values. tables_ptr: IQ2_XXS compact lookup words."""
    if FORM == 12:  # a: i16 sc | m << 8, b: i32 d | dmin << 16 (f16 bits)
        d = _lo16_f16(b).to(tl.float32)
        dmin = _lo16_f16(b >> 16).to(tl.float32)
        a = a.to(tl.int32)
        s = d * (a & 255).to(tl.float32)  # d*sc, exact
        # -dmin*m, exact; a product with -1 flips the sign of a zero too (tl's unary minus is 0 - x)
        nm = dmin * ((a >> 8) & 255).to(tl.float32) * -1.0
        w = _affine(c, s, nm, 4, F16, ASM, BN, BK // 32, 4)
    elif FORM == 10:  # a: u8 sc | m << 4, b: i32 d | dmin << 16
        d = _lo16_f16(b).to(tl.float32)
        dmin = _lo16_f16(b >> 16).to(tl.float32)
        a = a.to(tl.int32)
        s = d * (a & 15).to(tl.float32)
        nm = dmin * (a >> 4).to(tl.float32) * -1.0
        w = _affine(c, s, nm, 2, F16, ASM, BN, BK // 16, 2)
    elif FORM == 16:  # a: u8 s(2i) | s(2i+1) << 4 (read once per group), b: f16 d
        g = tl.arange(0, BK // 32)[None, :, None]
        sc8 = (2 * ((a.to(tl.int32) >> (4 * (g % 2))) & 15) + 1).to(tl.float32) * 0.125  # (2s+1)/8, exact
        w = _iq2_words(c, sc8, b.to(tl.float32), F16, ASM, BN, BK // 32)
    elif FORM == 17:  # c: u8 grid index, a: i32 GGUF sign word, b: f16 d
        # tables_ptr: int32 [384]: 256 grid words (nibble j = class c of grid value j), then 128
        # sign words (bit 4j+2 = sign of weight j, the parity bit included): one OR of two
        # lookups gives the fast form's code word
        v = tl.arange(0, 4)[None, None, :]
        sel = tl.load(tables_ptr + c.to(tl.int32)) | tl.load(tables_ptr + 256 + ((a >> (7 * v)) & 127))
        sc8 = (2 * ((a >> 28) & 15) + 1).to(tl.float32) * 0.125
        w = _iq2_words(sel, sc8, b.to(tl.float32), F16, ASM, BN, BK // 32)
    else:  # Q8_0, a: f16 d per group
        if F16 and ASM:
            o0, o1, o2, o3 = _asm_i8_word(c, tl.broadcast_to(a, (BN, BK // 32, 8)))
            w = join4(o0, o1, o2, o3)
        elif ASM:
            o0, o1, o2, o3 = _asm_i8_word_f32(c, tl.broadcast_to(a.to(tl.float32), (BN, BK // 32, 8)))
            w = join4(o0, o1, o2, o3)
        else:
            q = (_fields(c, 8, 4) ^ 128) - 128  # signed bytes
            w = q.to(tl.float32) * a.to(tl.float32)[:, :, :, None]
            if F16:
                w = w.to(tl.float16)
    return w.reshape(BN, BK)


@triton.jit
def weight_tile(p0, p1, p2, tables_ptr, r, k0, K, FORM: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    """Weights k0..k0+BK-1 of rows ``r`` (int64 [BN]), loaded and decoded in one go."""
    a, b = load_scales(p1, p2, r, k0, K, FORM, BN, BK)
    return decode_raw(load_codes(p0, r, k0, K, FORM, BN, BK), a, b, tables_ptr, FORM, F16, ASM, BN, BK)
