"""The in-kernel decoders (kernels/decode.py) against the packed forms' torch dequantize, bit for bit.

Through the interpreter (CI) the plain-tl twins run; on a GPU the PTX decoders run too and must
give the same bits as their twins. Blocks are random bytes with extreme but valid f16 fields
(subnormal, ±65504, negative), and K spans several super-blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from moetile.kernels.decode import join4, join8, weight_tile
from moetile.ops._launch import form_id, kernel_planes, tables_for
from moetile.quant import QuantTensor
from moetile.quant.pack import pack

FORMS = [("Q4_K", "auto", (0, 2)), ("Q2_K", "auto", (80, 82)), ("IQ2_XXS", "fast", (0,)),
         ("IQ2_XXS", "compact", (0,)), ("Q8_0", "auto", (0,))]
BLOCK = {"Q4_K": (256, 144), "Q2_K": (256, 84), "IQ2_XXS": (256, 66), "Q8_0": (32, 34)}


@triton.jit
def _tiles_kernel(p0, p1, p2, tables_ptr, out_ptr, N, K, FORM: tl.constexpr, F16: tl.constexpr,
                  ASM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    r = tl.minimum(n, N - 1).to(tl.int64)
    kk = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        w = weight_tile(p0, p1, p2, tables_ptr, r, k0, K, FORM, F16, ASM, BN, BK)
        tl.store(out_ptr + r[:, None] * K + (k0 + kk)[None, :], w, mask=(n < N)[:, None])


@triton.jit
def _join_kernel(out8_ptr, out4_ptr):
    i = (tl.arange(0, 2)[:, None, None] * 8 + tl.arange(0, 2)[None, :, None] * 4
         + tl.arange(0, 4)[None, None, :])  # [2, 2, 4] word index
    w = join8(8 * i, 8 * i + 1, 8 * i + 2, 8 * i + 3, 8 * i + 4, 8 * i + 5, 8 * i + 6, 8 * i + 7)
    tl.store(out8_ptr + tl.arange(0, 128), w.reshape(128))
    v = join4(4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3)
    tl.store(out4_ptr + tl.arange(0, 64), v.reshape(64))


def test_join_puts_weights_in_k_order(device):
    """The PTX decoders return weight j of each word as the j-th output; join8/join4 must lay
    them out in K order (tl.join appends its new axis last)."""
    o8 = torch.full((128,), -1, dtype=torch.int32, device=device)
    o4 = torch.full((64,), -1, dtype=torch.int32, device=device)
    _join_kernel[(1,)](o8, o4)
    assert o8.cpu().tolist() == list(range(128))
    assert o4.cpu().tolist() == list(range(64))


def decode_all(p, f16: bool, asm: bool, bk: int = 256) -> torch.Tensor:
    """The whole (N, K) matrix ``p`` as the kernels decode it: f16, or f32 when not ``f16``."""
    N, K = p.shape
    out = torch.full((N, K), float("nan"), dtype=torch.float16 if f16 else torch.float32, device=p.device)
    planes = kernel_planes(p.stack())
    table = tables_for(p, p.device)
    bn = 16
    _tiles_kernel[(triton.cdiv(N, bn),)](*planes, table if table is not None else planes[0], out, N, K,
                                         FORM=form_id(p), F16=f16, ASM=asm, BN=bn, BK=bk)
    return out


def _blocks(qtype, N, K, offs, seed, helpers, device) -> QuantTensor:
    elems, nbytes = BLOCK[qtype]
    nb = N * K // elems
    raw = helpers.random_bytes(nb, nbytes, seed)
    for i, off in enumerate(offs):
        helpers.set_f16(raw, off, helpers.extreme_f16(nb, seed + i))
    return QuantTensor(raw.reshape(N, -1), qtype, (N, K)).to(device)


def _same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    ia, ib = a.cpu().view(torch.int16 if a.dtype == torch.float16 else torch.int32), b.cpu().view(
        torch.int16 if b.dtype == torch.float16 else torch.int32)
    bad = (ia != ib).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.shape[0]} of {a.numel()} differ; first at {bad[0].tolist()}: "
                              f"{a.cpu()[tuple(bad[0])].item()!r} vs {b.cpu()[tuple(bad[0])].item()!r}")


@pytest.mark.parametrize("qtype, form, offs", FORMS, ids=lambda v: str(v))
@pytest.mark.parametrize("bk", [256, 128])
def test_twin_decoder_is_exact(qtype, form, offs, bk, helpers, device):
    """f16 tiles = f16(dequantize()), f32 tiles = dequantize(), bit for bit; N is not a
    multiple of the row block and K spans three super-blocks."""
    qt = _blocks(qtype, 20, 768, offs, 5, helpers, device)
    p = pack(qt, form)
    ref = qt.dequantize()
    with np.errstate(over="ignore"):
        _same_bits(decode_all(p, True, False, bk), ref.half(), f"{qtype}/{p.form} f16 twin")
    _same_bits(decode_all(p, False, False, bk), ref, f"{qtype}/{p.form} f32")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype, form, offs", FORMS, ids=lambda v: str(v))
def test_asm_decoder_matches_twin_gpu(qtype, form, offs, helpers):
    """The PTX decoders give the bits of their plain-tl twins (and of f16(dequantize()), or of
    dequantize() for the float32 ones)."""
    for seed in range(3):
        qt = _blocks(qtype, 96, 4096, offs, 100 + seed, helpers, "cuda")
        p = pack(qt, form)
        ref = qt.dequantize()
        for f16 in (True, False):  # f16 tiles (tensor cores), exact f32 tiles (mat-vec)
            twin = decode_all(p, f16, False)
            _same_bits(decode_all(p, f16, True), twin, f"{qtype}/{p.form} f16={f16} asm vs twin, seed {seed}")
            _same_bits(twin, ref.half() if f16 else ref, f"{qtype}/{p.form} f16={f16} twin vs dequantize")
