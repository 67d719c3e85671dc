"""Q8_0: bit-exact dequantization against gguf, quantizer quality, random blocks, errors."""

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
from moetile.quant import q8_0 as mod

COS_REF = 0.000074  # llama.cpp reference figures; we must be within 2 % of them or better
REL_REF = 0.0054
BB = mod.BLOCK_BYTES


def test_constants_match_gguf_and_registry():
    assert mod.QTYPE == "Q8_0"
    assert (mod.BLOCK_ELEMS, mod.BLOCK_BYTES) == GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0] == (32, 34)
    assert mq.get_format("q8_0").module is mod


def test_dequantize_random_bytes_bitexact(helpers):
    # fully random bytes, including inf / NaN f16 patterns; 32 rows of 64 blocks = 2048 blocks
    data = helpers.random_bytes(2048, BB, seed=1).reshape(32, 64 * BB)
    out = mod.dequantize(data)
    assert out.shape == (32, 64 * 32) and out.dtype == torch.float32
    helpers.assert_bitexact(helpers.gguf_reference(mod, data), out)


def test_dequantize_extreme_scales_bitexact(helpers):
    n = 1200
    data = helpers.random_bytes(n, BB, seed=2)
    helpers.set_f16(data, 0, helpers.extreme_f16(n, seed=3))  # d
    data[::3, 2:] = 0x80  # every quant = -128
    data[1::3, 2:] = 0x7F  # every quant = 127
    ref = helpers.gguf_reference(mod, data)
    assert np.isfinite(ref).all()
    assert (ref < -1e6).any() and (ref > 1e6).any()  # the extremes really are in there
    helpers.assert_bitexact(ref, mod.dequantize(data))


def test_dequantize_matches_spec_formula(helpers):
    data = helpers.random_bytes(1, BB, seed=5)
    helpers.set_f16(data, 0, np.array([-0.375]))
    q = data[0, 2:].view(torch.int8).tolist()
    out = mod.dequantize(data)[0].tolist()
    assert out == [-0.375 * v for v in q]


def test_quality_cos_metric(helpers):
    err = helpers.cos_metric(mod)
    print(f"Q8_0 cos metric {err:.7f} (reference {COS_REF})")
    assert err <= 1.02 * COS_REF


def test_quality_relative_rmse(helpers):
    err = helpers.rel_rmse(mod)
    print(f"Q8_0 relative RMSE {err:.5f} (reference {REL_REF})")
    assert err <= 1.02 * REL_REF


def test_quantize_output_is_valid_gguf(helpers):
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(6)) * 0.03
    q = mod.quantize(x)
    assert q.shape == (8, 32 * BB) and q.dtype == torch.uint8
    y = mod.dequantize(q)
    helpers.assert_bitexact(helpers.gguf_reference(mod, q), y)
    assert float((x - y).norm() / x.norm()) < 0.007


def test_importance_steers_the_error():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 1024, generator=g)
    imp = torch.exp(2 * torch.randn(1024, generator=g))
    plain = mod.dequantize(mod.quantize(x))
    steered = mod.dequantize(mod.quantize(x, imp))
    e_plain = float((imp * (x - plain) ** 2).sum())
    e_steered = float((imp * (x - steered) ** 2).sum())
    assert e_steered < 0.9 * e_plain
    z = mod.dequantize(mod.quantize(x, torch.zeros(1024)))
    assert torch.isfinite(z).all() and float((x - z).norm() / x.norm()) < 0.01


def test_negative_extreme_uses_minus_128():
    # a block whose largest magnitude is negative can use the level −128 for a finer step
    x = torch.linspace(-1.0, 0.9, 32).view(1, 32)
    q = mod.quantize(x)
    assert int(q[0, 2:].view(torch.int8).min()) <= -127
    assert float((mod.dequantize(q) - x).abs().max()) <= 1.0 / 254 + 1e-3


def test_roundtrip_shapes_public_api():
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float16)
    qt = mq.quantize(x, "q8_0")
    assert qt.qtype == "Q8_0" and qt.shape == (2, 3, 64) and qt.data.shape == (2, 3, 2 * BB)
    y = qt.dequantize()
    assert y.shape == (2, 3, 64) and y.dtype == torch.float32
    assert torch.equal(mq.dequantize(qt.data, "Q8_0"), y)


@settings(max_examples=25, deadline=None)
@given(
    arrays(np.float32, (4, 64), elements=st.floats(-1, 1, width=32)),
    st.floats(-4, 4),
)
def test_hypothesis_finite_and_bounded(x, log_scale):
    x = torch.from_numpy(x) * 10.0**log_scale
    q = quantize_in_range(mod, x, 32)
    if q is None:  # a block too small for f16's scales is refused, not returned as zeros
        return
    y = mod.dequantize(q)
    assert torch.isfinite(y).all()
    xb, eb = x.view(-1, 32), (x - y).view(-1, 32)
    # rms error per block within one step of the plain max|x|/127 grid (plus the f16 subnormal step)
    amax = xb.abs().amax(1)
    assert (eb.pow(2).mean(1).sqrt() <= amax / 127 + 2.0**-24).all()


def test_random_blocks_properties(helpers):
    a = mod.random_blocks((4, 64, 1024), generator=torch.Generator().manual_seed(9))
    b = mod.random_blocks((4, 64, 1024), generator=torch.Generator().manual_seed(9))
    c = mod.random_blocks((4, 64, 1024), generator=torch.Generator().manual_seed(10))
    assert a.shape == (4, 64, 32 * BB) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = a.view(-1, BB)[:, 0:2].contiguous().view(torch.float16).float()
    assert (d > 0).all() and torch.isfinite(d).all()
    v = mod.dequantize(a)
    helpers.assert_bitexact(helpers.gguf_reference(mod, a), v)
    assert torch.isfinite(v).all() and (v != 0).any()
    assert 0.017 < float(v.std()) < 0.023
    assert float(v.abs().max()) < 0.2
    qt = mq.random_blocks("Q8_0", (8, 32))
    assert qt.data.shape == (8, BB)


def test_bad_inputs():
    with pytest.raises(TypeError, match="uint8"):
        mod.dequantize(torch.zeros(2, BB, dtype=torch.float32))
    with pytest.raises(ValueError, match="34"):
        mod.dequantize(torch.ones(2, 33, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float32"):
        mod.quantize(torch.ones(2, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="32"):
        mod.quantize(torch.ones(2, 48))
    with pytest.raises(ValueError, match="importance"):
        mod.quantize(torch.ones(2, 32), torch.ones(33))
    with pytest.raises(ValueError, match="32"):
        mod.random_blocks((4, 31))
    # the public API
    with pytest.raises(TypeError, match="uint8"):
        mq.dequantize(torch.ones(2, BB, dtype=torch.bool), "Q8_0")
    with pytest.raises(ValueError, match="34"):
        mq.dequantize(torch.ones(2, 35, dtype=torch.uint8), "Q8_0")
    with pytest.raises(ValueError, match="32"):
        mq.quantize(torch.ones(2, 40), "Q8_0")
    with pytest.raises(ValueError, match="bytes"):
        mq.QuantTensor(torch.ones(3, BB, dtype=torch.uint8), "Q8_0", (2, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(helpers):
    data = helpers.random_bytes(4096, BB, seed=11)
    helpers.set_f16(data, 0, helpers.extreme_f16(4096, seed=12))
    helpers.assert_bitexact(helpers.gguf_reference(mod, data), mod.dequantize(data.cuda()))
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    y = mod.dequantize(mod.quantize(x.cuda())).cpu()
    assert float((x - y).norm() / x.norm()) <= 1.02 * REL_REF
    g = torch.Generator(device="cuda").manual_seed(1)
    r = mod.random_blocks((2, 128, 2048), generator=g)
    assert r.is_cuda and math.isclose(float(mod.dequantize(r).std()), 0.02, rel_tol=0.15)
