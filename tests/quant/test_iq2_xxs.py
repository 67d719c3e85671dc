"""IQ2_XXS: bit-exact dequantization against gguf, quantizer quality, tables, random blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import moetile.quant as mq
from moetile.quant import iq2_xxs

K = 4096
# references from the brief (llama.cpp-style quantizer), the quantizer must stay within 2 %
COS_REF = 0.007414
GAUSS_REF = 0.3441


def _gguf(data: torch.Tensor) -> np.ndarray:
    return gguf_dequantize(data.reshape(-1, data.shape[-1]).numpy(), GGMLQuantizationType.IQ2_XXS)


def _random_bytes(nblk: int, seed: int) -> torch.Tensor:
    """[nblk, 66] random blocks whose d is any finite f16 bit pattern (normal or subnormal, either sign)."""
    g = torch.Generator().manual_seed(seed)
    blk = torch.randint(0, 256, (nblk, 66), generator=g, dtype=torch.uint8)
    d = blk[:, :2].contiguous().view(torch.int16).view(torch.uint16).to(torch.int32)  # [nblk, 1]
    finite = (d & 0x7C00) != 0x7C00
    d = torch.where(finite, d, d & 0x83FF)  # exponent 31 (inf / nan) -> subnormal of the same sign
    blk[:, 0] = (d[:, 0] & 0xFF).to(torch.uint8)
    blk[:, 1] = (d[:, 0] >> 8).to(torch.uint8)
    return blk


def _set_d(blk: torch.Tensor, bits: list[int]) -> torch.Tensor:
    blk = blk.clone()
    for i, b in enumerate(bits):
        blk[i, 0], blk[i, 1] = b & 0xFF, b >> 8
    return blk


# ------------------------------------------------------------------------------------------ dequantize


def test_dequantize_bit_exact_random_blocks():
    blk = _random_bytes(2048, seed=0)
    extreme = [0x0001, 0x03FF, 0x0400, 0x8001, 0x83FF, 0x7BFF, 0xFBFF, 0x7800, 0xBC00, 0x3C00, 0x0000, 0x8000]
    blk = _set_d(blk, extreme)
    blk[:64, 2:].view(64, 8, 8)[..., 7] |= 0xF0  # all-max scale nibbles
    blk[64:128, 2:].view(64, 8, 8)[..., 7] &= 0x0F  # all-zero scale nibbles
    rows = blk.reshape(128, 16 * 66)  # [128, K]
    out = iq2_xxs.dequantize(rows)
    ref = _gguf(rows)
    assert out.dtype == torch.float32 and out.shape == (128, K)
    assert np.isfinite(ref).all()
    bad = np.flatnonzero(out.numpy().view(np.uint32) != ref.view(np.uint32))
    assert bad.size == 0, (
        f"{bad.size} mismatches, first at {bad[0]}: {out.flatten()[bad[0]]} vs {ref.flatten()[bad[0]]}"
    )


def test_dequantize_matches_reference_formula():
    # independent scalar evaluation of §4.4 on a few blocks
    blk = _random_bytes(4, seed=3)
    out = iq2_xxs.dequantize(blk).reshape(4, 256)
    grid = iq2_xxs.grid_u8().tolist()
    ks = iq2_xxs.ksigns().tolist()
    for b in range(4):
        raw = bytes(blk[b].tolist())
        d = float(np.frombuffer(raw[:2], dtype=np.float16)[0])
        for g in range(8):
            a = int.from_bytes(raw[2 + 8 * g : 6 + 8 * g], "little")
            w = int.from_bytes(raw[6 + 8 * g : 10 + 8 * g], "little")
            db = d * (0.5 + (w >> 28)) * 0.25
            for sub in range(4):
                idx = (a >> (8 * sub)) & 0xFF
                signs = ks[(w >> (7 * sub)) & 0x7F]
                for j in range(8):
                    want = db * grid[idx][j] * (-1.0 if (signs >> j) & 1 else 1.0)
                    got = out[b, 32 * g + 8 * sub + j].item()
                    assert got == pytest.approx(want, rel=1e-6, abs=0.0), (b, g, sub, j)


def test_dequantize_shapes():
    blk = iq2_xxs.random_blocks((2, 3, 512), torch.Generator().manual_seed(1))
    assert blk.shape == (2, 3, 132) and blk.dtype == torch.uint8
    out = iq2_xxs.dequantize(blk)
    assert out.shape == (2, 3, 512)
    np.testing.assert_array_equal(out.reshape(6, 512).numpy(), _gguf(blk))


# ------------------------------------------------------------------------------------------ tables


def test_tables():
    g8 = iq2_xxs.grid_u8()
    assert g8.shape == (256, 8) and g8.dtype == torch.uint8
    assert set(g8.unique().tolist()) == {8, 25, 43}
    assert len({tuple(r) for r in g8.tolist()}) == 256
    g64 = iq2_xxs.grid_u64()
    assert g64.shape == (256,) and g64.dtype == torch.int64
    unpacked = torch.stack([(g64 >> (8 * j)) & 0xFF for j in range(8)], dim=-1)
    assert torch.equal(unpacked, g8.long())
    ks = iq2_xxs.ksigns()
    assert ks.shape == (128,) and ks.dtype == torch.uint8
    for k, v in enumerate(ks.tolist()):
        assert v & 0x7F == k
        assert bin(v).count("1") % 2 == 0  # bit 7 makes the count of negatives even
    assert iq2_xxs.grid_u8() is g8  # cached


# ------------------------------------------------------------------------------------------ quantize


def _roundtrip(x: torch.Tensor, importance=None) -> torch.Tensor:
    q = iq2_xxs.quantize(x, importance)
    assert q.dtype == torch.uint8 and q.shape == (*x.shape[:-1], x.shape[-1] // 256 * 66)
    return iq2_xxs.dequantize(q)


def test_quantize_cos_metric():
    # llama.cpp test-quantize-fns: sqrt(sum of squared errors) / n
    x = (0.1 + 2 * torch.cos(torch.arange(K, dtype=torch.float64))).float()[None]
    err = math.sqrt(((x - _roundtrip(x)).double() ** 2).sum().item()) / K
    assert err <= 1.02 * COS_REF, err


def test_quantize_gaussian_rel_rmse():
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(0))
    rel = ((x - _roundtrip(x)).norm() / x.norm()).item()
    assert rel <= 1.02 * GAUSS_REF, rel


def test_quantize_scale_invariance_and_f16_range():
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(2))
    rels = []
    for s in (1e-3, 1.0, 300.0):
        y = _roundtrip(x * s)
        assert torch.isfinite(y).all()
        rels.append(((x * s - y).norm() / (x * s).norm()).item())
    assert max(rels) < 0.36 and max(rels) - min(rels) < 0.01, rels


def test_quantize_stored_d_is_f16_and_signs_follow_x():
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(4))
    q = iq2_xxs.quantize(x, None)
    d = q.reshape(-1, 66)[:, :2].contiguous().view(torch.float16).float()
    assert (d > 0).all() and torch.isfinite(d).all()
    y = iq2_xxs.dequantize(q)
    # at most one sign per 8-vector disagrees with x (parity), and only where x has odd negatives
    wrong = ((y < 0) != (x < 0)).reshape(-1, 8).sum(-1)
    odd = ((x < 0).reshape(-1, 8).sum(-1) % 2) == 1
    assert (wrong <= odd.long()).all()
    assert (wrong == odd.long()).all()  # the grid has no zeros, so a forced flip always shows


def test_quantize_zero_block_and_ties():
    x = torch.randn(2, 768, generator=torch.Generator().manual_seed(5))
    x[0, 256:512] = 0.0  # one all-zero block between non-zero ones
    x[1, :256] = 0.25  # constant block
    y = _roundtrip(x)
    assert torch.isfinite(y).all()
    assert (y[0, 256:512] == 0).all()
    assert ((y[1, :256] - 0.25).norm() / (0.25 * 16)).item() < 0.5  # no flat grid point exists


def test_grid_choice_is_optimal_at_stored_scales():
    # brute force in float64: for the stored d and scale nibbles, no other grid point (with its
    # own cheapest parity flip) gives a smaller error for any 8-vector
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(12)).double()
    q = iq2_xxs.quantize(x.float(), None)
    y = iq2_xxs.dequantize(q).double().reshape(-1, 8)
    blk = q.reshape(-1, 66)
    d = blk[:, :2].contiguous().view(torch.float16).double()  # [B, 1]
    w = blk[:, 2:].reshape(-1, 8, 8)[..., 4:].long()
    nib = (w[..., 3] >> 4).double()  # [B, 8]
    c = (d * (0.5 + nib) * 0.25).repeat_interleave(4, dim=1).reshape(-1, 1, 1)  # [V, 1, 1]
    xv = x.reshape(-1, 8)
    cand = c * iq2_xxs.grid_u8().double()[None] * torch.where(xv < 0, -1.0, 1.0)[:, None, :]  # [V, 256, 8]
    err = (cand - xv[:, None, :]) ** 2  # [V, 256, 8]
    odd = ((xv < 0).sum(-1) % 2 == 1)[:, None]
    # a forced flip turns (|x| - v)² into (|x| + v)²: pick the cheapest element
    extra = ((xv.abs()[:, None, :] + cand.abs()) ** 2 - err).min(-1).values
    best = err.sum(-1) + torch.where(odd, extra, torch.zeros_like(extra))
    got = ((y - xv) ** 2).sum(-1)
    assert (got <= best.min(-1).values * (1 + 1e-5) + 1e-12).all()


def test_requantize_of_random_blocks_is_close():
    # values that are exactly representable: the search should come back to (nearly) them
    blk = iq2_xxs.random_blocks((16, 1024), torch.Generator().manual_seed(6))
    x = iq2_xxs.dequantize(blk)
    rel = ((x - _roundtrip(x)).norm() / x.norm()).item()
    assert rel < 0.05, rel


def test_importance_changes_result_and_helps_emphasised_columns():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 1024, generator=g)
    hot = torch.zeros(1024, dtype=torch.bool)
    hot[torch.randperm(1024, generator=g)[:100]] = True
    imp = torch.where(hot, 100.0, 1.0)
    q_plain = iq2_xxs.quantize(x, None)
    q_imp = iq2_xxs.quantize(x, imp)
    assert not torch.equal(q_plain, q_imp)
    e_plain = (x - iq2_xxs.dequantize(q_plain)) ** 2
    e_imp = (x - iq2_xxs.dequantize(q_imp)) ** 2
    assert e_imp[:, hot].mean() < 0.7 * e_plain[:, hot].mean()
    assert (e_imp * imp).sum() < (e_plain * imp).sum()
    # uniform importance is the same as none
    assert torch.equal(iq2_xxs.quantize(x, torch.full((1024,), 4.0)), q_plain)


def test_public_api_roundtrip_shapes():
    g = torch.Generator().manual_seed(8)
    for shape in [(3, 256), (2, 4, 512)]:
        x = torch.randn(*shape, generator=g) * 0.02
        qt = mq.quantize(x, "iq2_xxs")
        assert qt.qtype == "IQ2_XXS" and qt.shape == shape
        assert qt.data.shape == (*shape[:-1], shape[-1] // 256 * 66)
        y = mq.dequantize(qt)
        assert y.shape == shape and y.dtype == torch.float32
        assert torch.equal(y, mq.dequantize(qt.data, "IQ2_XXS", shape))
        assert ((x - y).norm() / x.norm()).item() < 0.36
    xb = (torch.randn(2, 256, generator=g)).to(torch.bfloat16)
    assert mq.quantize(xb, "iq2_xxs", importance=torch.ones(256)).shape == (2, 256)


# ------------------------------------------------------------------------------------------ random blocks


def test_random_blocks():
    shape = (64, 2048)
    a = iq2_xxs.random_blocks(shape, torch.Generator().manual_seed(9))
    b = iq2_xxs.random_blocks(shape, torch.Generator().manual_seed(9))
    c = iq2_xxs.random_blocks(shape, torch.Generator().manual_seed(10))
    assert a.shape == (64, 8 * 66) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = a.reshape(-1, 66)[:, :2].contiguous().view(torch.float16).float()
    assert (d > 0).all() and torch.isfinite(d).all()
    w = iq2_xxs.dequantize(a)
    assert (w != 0).all()
    assert 0.015 < w.std().item() < 0.025
    assert abs(w.mean().item()) < 0.002
    np.testing.assert_array_equal(w.numpy(), _gguf(a))
    qt = mq.random_blocks("iq2_xxs", (2, 8, 256), torch.Generator().manual_seed(1))
    assert qt.shape == (2, 8, 256) and qt.data.shape == (2, 8, 66)


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs():
    with pytest.raises(ValueError, match="66"):
        mq.dequantize(torch.zeros(4, 65, dtype=torch.uint8), "iq2_xxs")
    with pytest.raises(TypeError, match="uint8"):
        mq.dequantize(torch.ones(4, 66), "iq2_xxs")
    with pytest.raises(ValueError, match="256"):
        mq.quantize(torch.ones(4, 100), "iq2_xxs")
    with pytest.raises(ValueError, match="shape"):
        mq.quantize(torch.ones(256), "iq2_xxs")
    with pytest.raises(ValueError, match="importance"):
        mq.quantize(torch.ones(2, 256), "iq2_xxs", importance=torch.ones(128))
    with pytest.raises(ValueError, match=r"x\[0, 0\] = nan is not finite"):
        mq.quantize(torch.full((2, 256), float("nan")), "iq2_xxs")
    with pytest.raises(TypeError, match="floating"):
        mq.quantize(torch.ones(2, 256, dtype=torch.int32), "iq2_xxs")
    with pytest.raises(ValueError, match="256"):
        mq.random_blocks("iq2_xxs", (4, 300))
    with pytest.raises(ValueError, match="importance"):
        iq2_xxs.quantize(torch.ones(2, 256), -torch.ones(256))
    with pytest.raises(ValueError, match="66"):
        iq2_xxs.dequantize(torch.zeros(3, 0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        iq2_xxs.random_blocks((4, 0))


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    blk = _random_bytes(4096, seed=11).reshape(256, 16 * 66)
    torch.testing.assert_close(iq2_xxs.dequantize(blk.cuda()).cpu(), iq2_xxs.dequantize(blk), rtol=0, atol=0)
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(0))
    q = iq2_xxs.quantize(x.cuda(), None)
    assert q.is_cuda
    rel = ((x - iq2_xxs.dequantize(q).cpu()).norm() / x.norm()).item()
    assert rel <= 1.02 * GAUSS_REF, rel
    g = torch.Generator(device="cuda").manual_seed(3)
    r = iq2_xxs.random_blocks((4, 64, 1024), g, device="cuda")
    assert r.is_cuda and r.shape == (4, 64, 264)
