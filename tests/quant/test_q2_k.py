"""Q2_K: bit-exact dequantization against gguf, quantizer quality, random blocks, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from helpers import quantize_in_range
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import moetile.quant as mq
from moetile.quant import q2_k as mod

COS_REF = 0.004673  # llama.cpp reference figures; we must be within 2 % of them or better
REL_REF = 0.2970
BB = mod.BLOCK_BYTES


def test_constants_match_gguf_and_registry():
    assert mod.QTYPE == "Q2_K"
    assert (mod.BLOCK_ELEMS, mod.BLOCK_BYTES) == GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K] == (256, 84)
    assert mq.get_format("q2_k").module is mod


def test_dequantize_random_bytes_bitexact(helpers):
    # fully random bytes, including inf / NaN f16 patterns; 16 rows of 64 blocks = 1024 blocks
    data = helpers.random_bytes(1024, BB, seed=1).reshape(16, 64 * BB)
    out = mod.dequantize(data)
    assert out.shape == (16, 64 * 256) and out.dtype == torch.float32
    helpers.assert_bitexact(helpers.gguf_reference(mod, data), out)


def test_dequantize_extreme_scales_bitexact(helpers):
    n = 1200
    data = helpers.random_bytes(n, BB, seed=2)
    helpers.set_f16(data, 80, helpers.extreme_f16(n, seed=3))  # d
    helpers.set_f16(data, 82, helpers.extreme_f16(n, seed=4))  # dmin
    data[::3, 0:16] = 0xFF  # every 4-bit scale and min = 15
    data[::5, 16:80] = 0xFF  # every quant = 3
    ref = helpers.gguf_reference(mod, data)
    assert np.isfinite(ref).all()
    assert (ref < 0).any() and (ref > 1e4).any()  # the extremes really are in there
    helpers.assert_bitexact(ref, mod.dequantize(data))


def test_dequantize_matches_spec_formula(helpers):
    """One block checked against the layout written out element by element (independent of gguf)."""
    data = helpers.random_bytes(1, BB, seed=5)
    helpers.set_f16(data, 80, np.array([0.25]))
    helpers.set_f16(data, 82, np.array([0.125]))
    b = data[0].tolist()
    out = mod.dequantize(data)[0].tolist()
    for i in range(256):
        h, r = divmod(i, 128)
        s, el = divmod(r, 32)
        q = (b[16 + 32 * h + el] >> (2 * s)) & 3
        j = 8 * h + 2 * s + el // 16
        assert j == i // 16
        assert out[i] == 0.25 * (b[j] & 0xF) * q - 0.125 * (b[j] >> 4), i


def test_quality_cos_metric(helpers):
    err = helpers.cos_metric(mod)
    print(f"Q2_K cos metric {err:.6f} (reference {COS_REF})")
    assert err <= 1.02 * COS_REF


def test_quality_relative_rmse(helpers):
    err = helpers.rel_rmse(mod)
    print(f"Q2_K relative RMSE {err:.4f} (reference {REL_REF})")
    assert err <= 1.02 * REL_REF


def test_quantize_output_is_valid_gguf(helpers):
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(6)) * 0.03
    q = mod.quantize(x)
    assert q.shape == (8, 4 * BB) and q.dtype == torch.uint8
    y = mod.dequantize(q)
    helpers.assert_bitexact(helpers.gguf_reference(mod, q), y)
    assert float((x - y).norm() / x.norm()) < 0.32


def test_importance_steers_the_error():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 1024, generator=g)
    imp = torch.exp(2 * torch.randn(1024, generator=g))
    plain = mod.dequantize(mod.quantize(x))
    steered = mod.dequantize(mod.quantize(x, imp))
    e_plain = float((imp * (x - plain) ** 2).sum())
    e_steered = float((imp * (x - steered) ** 2).sum())
    assert e_steered < 0.8 * e_plain
    # zero importance everywhere still quantizes sensibly
    z = mod.dequantize(mod.quantize(x, torch.zeros(1024)))
    assert torch.isfinite(z).all() and float((x - z).norm() / x.norm()) < 0.5


def test_constant_and_one_sided_rows():
    x = torch.stack([torch.full((256,), -0.7), torch.full((256,), 0.3), torch.linspace(0.1, 2.0, 256)])
    y = mod.dequantize(mod.quantize(x))
    assert torch.allclose(y, x, rtol=0, atol=0.2)
    assert torch.allclose(y[0], x[0], rtol=5e-2, atol=0)  # a constant is held by the min alone


def test_roundtrip_shapes_public_api():
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(8), dtype=torch.bfloat16)
    qt = mq.quantize(x, "q2_k")
    assert qt.qtype == "Q2_K" and qt.shape == (2, 3, 512) and qt.data.shape == (2, 3, 2 * BB)
    y = qt.dequantize()
    assert y.shape == (2, 3, 512) and y.dtype == torch.float32
    assert torch.equal(mq.dequantize(qt.data, "Q2_K"), y)


@settings(max_examples=25, deadline=None)
@given(
    arrays(np.float32, (2, 512), elements=st.floats(-1, 1, width=32)),
    st.floats(-4, 4),
)
def test_hypothesis_finite_and_bounded(x, log_scale):
    x = torch.from_numpy(x) * 10.0**log_scale
    q = quantize_in_range(mod, x, 256)
    if q is None:  # a block too small for f16's scales is refused, not returned as zeros
        return
    y = mod.dequantize(q)
    assert torch.isfinite(y).all()
    xb, eb = x.view(-1, 256), (x - y).view(-1, 256)
    # rms error per block within 1/3 of the span of the block and 0 (that of the plain min/max
    # grid), plus f16 rounding of the super-scales and the f16 subnormal step 2^-24 for tiny values
    span = xb.amax(1).clamp(min=0) - xb.amin(1).clamp(max=0)
    assert (eb.pow(2).mean(1).sqrt() <= span / 3 + 1e-3 * xb.abs().amax(1) + 2.0**-22).all()


def test_random_blocks_properties(helpers):
    a = mod.random_blocks((4, 64, 1024), generator=torch.Generator().manual_seed(9))
    b = mod.random_blocks((4, 64, 1024), generator=torch.Generator().manual_seed(9))
    c = mod.random_blocks((4, 64, 1024), generator=torch.Generator().manual_seed(10))
    assert a.shape == (4, 64, 4 * BB) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = a.view(-1, BB)[:, 80:82].contiguous().view(torch.float16).float()
    assert (d > 0).all() and torch.isfinite(d).all()
    v = mod.dequantize(a)
    helpers.assert_bitexact(helpers.gguf_reference(mod, a), v)
    assert torch.isfinite(v).all() and (v != 0).any()
    assert 0.017 < float(v.std()) < 0.023
    assert float(v.abs().max()) < 0.2
    qt = mq.random_blocks("Q2_K", (8, 256))
    assert qt.data.shape == (8, BB)


def test_bad_inputs():
    with pytest.raises(TypeError, match="uint8"):
        mod.dequantize(torch.zeros(2, BB, dtype=torch.int16))
    with pytest.raises(ValueError, match="84"):
        mod.dequantize(torch.ones(2, BB + 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float32"):
        mod.quantize(torch.ones(2, 256, dtype=torch.float16))
    with pytest.raises(ValueError, match="256"):
        mod.quantize(torch.ones(2, 128))
    with pytest.raises(ValueError, match="importance"):
        mod.quantize(torch.ones(2, 256), torch.ones(2, 256))
    with pytest.raises(ValueError, match="non-negative"):
        mod.quantize(torch.ones(2, 256), torch.full((256,), float("nan")))
    with pytest.raises(ValueError, match="256"):
        mod.random_blocks((4, 0))
    # the public API
    with pytest.raises(TypeError, match="uint8"):
        mq.dequantize(torch.ones(2, BB, dtype=torch.int8), "Q2_K")
    with pytest.raises(ValueError, match="84"):
        mq.dequantize(torch.ones(2, 85, dtype=torch.uint8), "Q2_K")
    with pytest.raises(ValueError, match="256"):
        mq.quantize(torch.ones(2, 32), "Q2_K")
    with pytest.raises(ValueError, match="bytes"):
        mq.QuantTensor(torch.ones(2, 2 * BB, dtype=torch.uint8), "Q2_K", (2, 256))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(helpers):
    data = helpers.random_bytes(4096, BB, seed=11)
    helpers.set_f16(data, 80, helpers.extreme_f16(4096, seed=12))
    helpers.assert_bitexact(helpers.gguf_reference(mod, data), mod.dequantize(data.cuda()))
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    y = mod.dequantize(mod.quantize(x.cuda())).cpu()
    assert float((x - y).norm() / x.norm()) <= 1.02 * REL_REF
    g = torch.Generator(device="cuda").manual_seed(1)
    r = mod.random_blocks((2, 128, 2048), generator=g)
    assert r.is_cuda and math.isclose(float(mod.dequantize(r).std()), 0.02, rel_tol=0.15)
