"""Packed forms (quant/pack.py): lossless against GGUF blocks, bit for bit, on random bytes (any
bit pattern GGUF allows) and on blocks whose f16 fields are extreme (subnormal, ±65504, negative)."""

from __future__ import annotations

import pytest
import torch

from moetile.quant import QuantTensor, random_blocks
from moetile.quant.pack import PackedTensor, pack, packed, resolve_form

# (qtype, form, byte offsets of the f16 fields in a block)
FORMS = [("Q4_K", "planar", (0, 2)), ("Q2_K", "planar", (80, 82)), ("IQ2_XXS", "fast", (0,)),
         ("IQ2_XXS", "compact", (0,)), ("Q8_0", "planar", (0,))]
BLOCK = {"Q4_K": (256, 144), "Q2_K": (256, 84), "IQ2_XXS": (256, 66), "Q8_0": (32, 34)}
# bits per weight of each form's planes (module docstring of moetile.quant.pack)
BPW = {("Q4_K", "planar"): 4.625, ("Q2_K", "planar"): 2.625, ("IQ2_XXS", "fast"): 4.1875,
       ("IQ2_XXS", "compact"): 2.0625, ("Q8_0", "planar"): 8.5}


def _random_raw(qtype, E, N, K, seed, helpers, extreme: bool) -> QuantTensor:
    elems, nbytes = BLOCK[qtype]
    nb = E * N * K // elems
    raw = helpers.random_bytes(nb, nbytes, seed)
    offs = [o for q, _, o in FORMS if q == qtype][0]
    for i, off in enumerate(offs):
        vals = helpers.extreme_f16(nb, seed + i) if extreme else helpers.extreme_f16(nb, seed + i) * 0 + 0.01
        helpers.set_f16(raw, off, vals)
    return QuantTensor(raw.reshape(E, N, -1), qtype, (E, N, K))


@pytest.mark.parametrize("qtype, form, offs", FORMS, ids=lambda v: str(v))
@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme-f16"])
def test_pack_is_lossless_bitwise(qtype, form, offs, extreme, helpers):
    qt = _random_raw(qtype, 3, 5, 768, 11, helpers, extreme)
    p = pack(qt, form if form != "planar" else "auto")
    assert (p.qtype, p.form, p.shape) == (qtype, form, qt.shape)
    ref = qt.dequantize()
    helpers.assert_bitexact(ref.numpy(), p.dequantize())
    # expert views and a single matrix agree with the stack
    helpers.assert_bitexact(ref[2].numpy(), p.expert(2).dequantize())
    helpers.assert_bitexact(ref[1].numpy(), pack(qt.expert(1), form if form != "planar" else "auto").dequantize())


@pytest.mark.parametrize("qtype, form, offs", FORMS, ids=lambda v: str(v))
def test_nbytes_per_form(qtype, form, offs):
    qt = random_blocks(qtype, (2, 4, 512), generator=torch.Generator().manual_seed(0))
    p = pack(qt, form if form != "planar" else "auto")
    assert p.nbytes * 8 / (2 * 4 * 512) == BPW[(qtype, form)]


def test_forms_and_cache():
    assert resolve_form("q4_k", "compact") == resolve_form("Q4_K", "fast") == "planar"
    assert resolve_form("IQ2_XXS", "compact") == "compact"
    with pytest.raises(ValueError, match="form must be one of"):
        resolve_form("Q4_K", "tiny")
    qt = random_blocks("IQ2_XXS", (2, 4, 256), generator=torch.Generator().manual_seed(1))
    a = packed(qt, "compact")
    assert packed(qt, "compact") is a  # packed once per QuantTensor and form
    assert packed(qt, "fast") is not a and packed(qt, "fast").form == "fast"
    assert pack(a) is a and pack(a, "compact") is a
    with pytest.raises(ValueError, match="already packed"):
        pack(a, "fast")
    with pytest.raises(TypeError, match="QuantTensor"):
        pack(torch.zeros(4, dtype=torch.uint8))


def test_plane_validation():
    p = pack(random_blocks("Q4_K", (2, 4, 256), generator=torch.Generator().manual_seed(2)))
    planes = dict(p.planes)
    planes["codes"] = planes["codes"][:, :, :64]
    with pytest.raises(ValueError, match="plane 'codes' must be"):
        PackedTensor("Q4_K", "planar", (2, 4, 256), planes)
    with pytest.raises(ValueError, match="no packed form"):
        PackedTensor("Q4_K", "fast", (2, 4, 256), dict(p.planes))
    with pytest.raises(ValueError, match="multiple of 256"):
        pack(random_blocks("Q8_0", (4, 96)))
    assert p.stack() is p and p.expert(0).stack().shape == (1, 4, 256)
    with pytest.raises(IndexError):
        p.expert(2)
