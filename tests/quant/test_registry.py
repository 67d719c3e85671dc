"""The quant registry (formats.py), QuantTensor (tensor.py) and the public wrappers (__init__.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import moetile.quant as mq
from moetile.quant import QuantTensor

# the types whose modules this test file can rely on (IQ2_XXS is checked only if present)
OWN = ("Q4_K", "Q2_K", "Q8_0")
HAVE = OWN + (("IQ2_XXS",) if importlib.util.find_spec("moetile.quant.iq2_xxs") else ())


def _raw(qtype: str, shape) -> torch.Tensor:
    """Valid blocks (finite values) of the right size for logical ``shape``."""
    return mq.get_format(qtype).module.random_blocks(shape, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- formats


def test_formats_match_gguf():
    assert mq.QTYPES == ("Q4_K", "Q2_K", "IQ2_XXS", "Q8_0")
    for name, fmt in mq.FORMATS.items():
        t = GGMLQuantizationType[name]
        assert fmt.name == name and fmt.ggml_type is t
        assert (fmt.block_elems, fmt.block_bytes) == GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("name", HAVE)
def test_module_contract(name):
    mod = mq.get_format(name).module
    assert mod.QTYPE == name
    assert (mod.BLOCK_ELEMS, mod.BLOCK_BYTES) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    for fn in ("dequantize", "quantize", "random_blocks"):
        assert callable(getattr(mod, fn))


def test_canonical_names():
    assert mq.canonical("q4_k") == "Q4_K"
    assert mq.canonical("  iq2_xxs ") == "IQ2_XXS"
    assert mq.canonical(GGMLQuantizationType.Q8_0) == "Q8_0"
    assert mq.get_format("Q2_k") is mq.FORMATS["Q2_K"]
    with pytest.raises(ValueError, match="Q5_K"):
        mq.canonical("Q5_K")
    with pytest.raises(ValueError, match="supports"):
        mq.canonical(GGMLQuantizationType.Q6_K)
    with pytest.raises(TypeError, match="int"):
        mq.canonical(12)


def test_row_bytes():
    assert mq.get_format("Q4_K").row_bytes(4096) == 16 * 144
    assert mq.get_format("Q2_K").row_bytes(256) == 84
    assert mq.get_format("Q8_0").row_bytes(64) == 68
    for k in (0, -256, 255, 100):
        with pytest.raises(ValueError, match=f"K={k}"):
            mq.get_format("Q4_K").row_bytes(k)
    with pytest.raises(ValueError, match="32"):
        mq.get_format("Q8_0").row_bytes(48)


# --------------------------------------------------------------------------- QuantTensor


@pytest.mark.parametrize("name", OWN)
def test_quant_tensor_basics(name):
    shape = (3, 4, 512)
    data = _raw(name, shape)
    qt = QuantTensor(data, name.lower(), shape)
    fmt = mq.get_format(name)
    assert qt.qtype == name and qt.format is fmt and qt.shape == shape
    assert qt.nbytes == 3 * 4 * fmt.row_bytes(512) == data.numel()
    assert qt.row_bytes == fmt.row_bytes(512)
    assert qt.num_experts == 3 and qt.device == torch.device("cpu")
    assert name in repr(qt) and str(shape) in repr(qt)
    y = qt.dequantize()
    assert y.shape == shape and y.dtype == torch.float32
    assert torch.equal(y, fmt.module.dequantize(data))


def test_quant_tensor_expert_is_a_view():
    data = _raw("Q4_K", (4, 2, 256))
    qt = QuantTensor(data, "Q4_K", (4, 2, 256))
    e = qt.expert(2)
    assert e.shape == (2, 256) and e.data.data_ptr() == data[2].data_ptr()
    assert torch.equal(e.dequantize(), qt.dequantize()[2])
    assert torch.equal(qt.expert(-1).data, data[3])
    for bad in (4, -5):
        with pytest.raises(IndexError, match="out of range"):
            qt.expert(bad)
    with pytest.raises(ValueError, match="expert stack"):
        _ = e.num_experts


def test_quant_tensor_to_and_reshape():
    shape = (2, 3, 64)
    flat = _raw("Q8_0", shape).reshape(-1)  # flat bytes of the right count are accepted
    qt = QuantTensor(flat, "Q8_0", shape)
    assert qt.data.shape == (2, 3, 68)
    moved = qt.to("cpu")
    assert moved.shape == shape and moved.qtype == "Q8_0" and torch.equal(moved.data, qt.data)
    strided = _raw("Q8_0", (6, 64)).t().contiguous().t()  # same values, not contiguous
    assert not strided.is_contiguous()
    qs = QuantTensor(strided, "Q8_0", (6, 64))
    assert qs.data.is_contiguous() and torch.equal(qs.data, strided)


def test_quant_tensor_bad_inputs():
    good = _raw("Q2_K", (2, 256))
    with pytest.raises(TypeError, match="torch.Tensor"):
        QuantTensor(good.numpy(), "Q2_K", (2, 256))
    with pytest.raises(TypeError, match="uint8"):
        QuantTensor(good.to(torch.int8), "Q2_K", (2, 256))
    with pytest.raises(ValueError, match="unknown quant type"):
        QuantTensor(good, "Q3_K", (2, 256))
    with pytest.raises(ValueError, match=r"\(N, K\) or \(E, N, K\)"):
        QuantTensor(good.reshape(-1), "Q2_K", (512,))
    with pytest.raises(ValueError, match=r"\(N, K\) or \(E, N, K\)"):
        QuantTensor(good, "Q2_K", (1, 1, 2, 256))
    with pytest.raises(ValueError, match="positive"):
        QuantTensor(good, "Q2_K", (0, 256))
    with pytest.raises(ValueError, match="K=200"):
        QuantTensor(good, "Q2_K", (2, 200))
    with pytest.raises(ValueError, match="bytes"):
        QuantTensor(good[:, :-1], "Q2_K", (2, 256))
    with pytest.raises(ValueError, match="bytes"):
        QuantTensor(good, "Q2_K", (3, 256))


# --------------------------------------------------------------------------- public wrappers


def test_public_dequantize():
    data = _raw("Q8_0", (4, 64))
    qt = QuantTensor(data, "Q8_0", (4, 64))
    assert torch.equal(mq.dequantize(qt), qt.dequantize())
    assert mq.dequantize(data, "Q8_0", shape=(2, 2, 64)).shape == (2, 2, 64)
    with pytest.raises(TypeError, match="qtype"):
        mq.dequantize(data)
    with pytest.raises(TypeError, match="uint8"):
        mq.dequantize(data.float(), "Q8_0")
    with pytest.raises(ValueError, match="34 bytes"):
        mq.dequantize(data[:, :-2], "Q8_0")
    with pytest.raises(ValueError, match="unknown"):
        mq.dequantize(data, "F16")


@pytest.mark.parametrize("name", OWN)
def test_public_quantize(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 256, generator=g)
    qt = mq.quantize(x, name, importance=torch.rand(256, generator=g).double())
    assert isinstance(qt, QuantTensor) and qt.shape == (3, 256) and qt.qtype == name
    assert float((qt.dequantize() - x).norm() / x.norm()) < 0.4
    with pytest.raises(TypeError, match="floating-point"):
        mq.quantize(torch.ones(3, 256, dtype=torch.int32), name)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        mq.quantize(torch.ones(256), name)
    with pytest.raises(ValueError, match="K=100"):
        mq.quantize(torch.ones(3, 100), name)
    with pytest.raises(ValueError, match=r"x\[0, 0\] = inf is not finite"):
        mq.quantize(torch.full((3, 256), float("inf")), name)
    with pytest.raises(ValueError, match="importance"):
        mq.quantize(x, name, importance=torch.ones(255))


@pytest.mark.parametrize("name", OWN)
def test_public_random_blocks(name):
    qt = mq.random_blocks(name, (2, 3, 512), generator=torch.Generator().manual_seed(2))
    again = mq.random_blocks(name, (2, 3, 512), generator=torch.Generator().manual_seed(2))
    assert qt.shape == (2, 3, 512) and torch.equal(qt.data, again.data)
    v = qt.dequantize()
    assert torch.isfinite(v).all() and (v != 0).any()
    with pytest.raises(ValueError, match="shape"):
        mq.random_blocks(name, (512,))
    with pytest.raises(ValueError, match="K=100"):
        mq.random_blocks(name, (2, 100))


# per-format bound on the relative error of a whole N(0, s²) tensor, for any scale s in f16's range
RANGE_BOUND = {"Q8_0": 0.05, "Q4_K": 0.15, "Q2_K": 0.4, "IQ2_XXS": 0.5}


@pytest.mark.parametrize("name", HAVE)
def test_quantizers_refuse_what_they_cannot_represent(name):
    """Every per-type quantizer (not only the public wrapper) refuses non-finite values and blocks
    whose f16 scale would over- or underflow, naming the row and columns; in range it is accurate."""
    quantize = mq.get_format(name).module.quantize
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 512, generator=g)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2, 7] = bad
        with pytest.raises(ValueError, match=rf"x\[1, 2, 7\] = {bad} is not finite"):
            quantize(y)
    for scale in (1e30, 1e8, 1e-12):
        y = x.clone()
        y[1, 0, 256:] *= scale  # one super-block (or eight Q8_0 blocks) out of range
        with pytest.raises(ValueError, match=r"row \[1, 0\] columns 256\.\.\d+: values up to .* outside"):
            quantize(y)
    for scale in (1e-4, 1.0, 1e4):
        y = x * scale
        y[0, 1, :256] = 0.0  # an all-zero block is exact
        back = mq.get_format(name).module.dequantize(quantize(y)).reshape(y.shape)
        assert torch.equal(back[0, 1, :256], y[0, 1, :256])
        assert float((back - y).norm() / y.norm()) < RANGE_BOUND[name], (name, scale)
