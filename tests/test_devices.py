"""Device arguments: CUDA asked for where there is none, meta tensors, bad names, mixed devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetile import devices
from moetile.gguf_io import open_gguf
from moetile.moe import DS4MoE, MoEWeights
from moetile.quant import QuantTensor, random_blocks
from moetile.quant.pack import pack

GOLDEN = Path(__file__).parent / "data" / "golden_q2.gguf"


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as a CPU-only one, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve():
    assert devices.resolve(None) is None
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="'meta' holds no data"):
        devices.resolve("meta")
    with pytest.raises(ValueError, match="not a device: 'gpu0'"):
        devices.resolve("gpu0")


def test_cuda_requested_without_cuda(no_cuda):
    for dev in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(RuntimeError, match="CUDA requested .* but not available"):
            devices.resolve(dev)
    with pytest.raises(RuntimeError, match="CUDA requested"):
        DS4MoE.from_gguf(GOLDEN, 0, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA requested"):
        open_gguf(GOLDEN).moe_layer(0, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA requested"):
        random_blocks("Q8_0", (2, 256), torch.Generator().manual_seed(0)).to("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_past_the_last_gpu():
    with pytest.raises(ValueError, match=f"cuda:{torch.cuda.device_count()} requested"):
        devices.resolve(f"cuda:{torch.cuda.device_count()}")


def test_meta_tensors_are_refused():
    g = torch.Generator().manual_seed(0)
    qt = random_blocks("Q4_K", (2, 32, 256), g)
    with pytest.raises(ValueError, match="meta"):
        qt.to("meta")
    with pytest.raises(ValueError, match="QuantTensor.data is a meta tensor"):
        QuantTensor(qt.data.to("meta"), "Q4_K", qt.shape)
    with pytest.raises(ValueError, match="meta"):
        pack(qt).to("meta")
    with pytest.raises(ValueError, match="meta"):
        open_gguf(GOLDEN).moe_layer(0, device="meta")
    w = _weights(g)
    with pytest.raises(ValueError, match="meta"):
        w.to("meta")
    with pytest.raises(ValueError, match="one device"):  # a meta router beside cpu experts
        MoEWeights(w.gate, w.up, w.down, router=w.router.to("meta"), top_k=2)


def test_mixed_devices_are_refused():
    g = torch.Generator().manual_seed(1)
    w = _weights(g)
    # a meta stand-in for "another device": the check compares devices before anything reads data
    for field in ("bias", "hash_table"):
        kw = {field: getattr(w, field).to("meta")}
        with pytest.raises(ValueError, match=rf"one device, got .*'{field}': device\(type='meta'\)"):
            MoEWeights(w.gate, w.up, w.down, router=w.router, top_k=2, **kw)


def _weights(g) -> MoEWeights:
    E, H, F = 4, 256, 256
    return MoEWeights(
        random_blocks("Q4_K", (E, F, H), g),
        random_blocks("Q4_K", (E, F, H), g),
        random_blocks("Q4_K", (E, H, F), g),
        router=torch.randn(E, H, generator=g).half(),
        bias=torch.rand(E, generator=g),
        hash_table=torch.randint(0, E, (10, 2), generator=g, dtype=torch.int32),
        top_k=2,
    )
