"""GGUF read/write: byte-exact round trips, metadata, MoE layer binding, and bad input."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType, GGUFValueType

from moetile.gguf_io import (
    GGUFError,
    GGUFFile,
    MoEConfig,
    MoELayerTensors,
    TensorNotFoundError,
    layer_tensor_names,
    open_gguf,
    write_gguf,
    write_moe_layers,
)
from moetile.quant import QTYPES, QuantTensor, get_format

E, F, H, V, KSEL = 4, 256, 512, 50, 3  # experts, FFN width, hidden, vocab, experts per token (K % 256 == 0)


def rand_qt(qtype: str, shape: tuple[int, ...], gen: torch.Generator) -> QuantTensor:
    """Random raw bytes (valid for byte-exact I/O, not for dequantization) of logical ``shape``."""
    rb = get_format(qtype).row_bytes(shape[-1])
    data = torch.randint(0, 256, (*shape[:-1], rb), dtype=torch.uint8, generator=gen)
    return QuantTensor(data, qtype, shape)


def make_layer(gen, qtype_gu="IQ2_XXS", qtype_down="Q2_K", hash_layer=False, shared=True, e=E, f=F, h=H):
    return MoELayerTensors(
        gate=rand_qt(qtype_gu, (e, f, h), gen),
        up=rand_qt(qtype_gu, (e, f, h), gen),
        down=rand_qt(qtype_down, (e, h, f), gen),
        router=torch.randn(e, h, generator=gen).half(),
        bias=torch.randn(e, generator=gen),
        tid2eid=torch.randint(0, e, (V, KSEL), generator=gen, dtype=torch.int32) if hash_layer else None,
        shared_gate=rand_qt("Q8_0", (f, h), gen) if shared else None,
        shared_up=rand_qt("Q8_0", (f, h), gen) if shared else None,
        shared_down=rand_qt("Q8_0", (h, f), gen) if shared else None,
        ffn_norm=torch.rand(h, generator=gen) + 0.5,
    )


def ds4_config(**kw) -> MoEConfig:
    base = dict(
        expert_count=E, expert_used_count=KSEL, expert_feed_forward_length=F, embedding_length=H,
        block_count=3, expert_shared_count=1, hash_layer_count=1, expert_weights_scale=1.5,
        expert_weights_norm=True, swiglu_clamp_exp=[10.0, 10.0, 10.0], vocab_size=V, rms_norm_eps=1e-6,
    )
    base.update(kw)
    return MoEConfig(**base)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", [(E, 32, 256), (E, 64, 512), (48, 512)])
def test_quant_round_trip_is_byte_exact(tmp_path, gen, qtype, shape):
    qt = rand_qt(qtype, shape, gen)
    other = rand_qt(qtype, shape, gen)
    path = tmp_path / "q.gguf"
    write_gguf(path, {"w": qt, "w2": other}, {})
    f = open_gguf(path)
    got = f.quant_tensor("w")
    assert got.qtype == qtype and got.shape == shape
    assert torch.equal(got.data, qt.data)
    assert torch.equal(f.quant_tensor("w2").data, other.data)
    assert f.tensor_type("w") == qtype
    assert f.tensor_shape("w") == shape
    # the file itself must list GGUF dims fastest-first: (K, N, E)
    raw = {t.name: t for t in GGUFReader(path).tensors}["w"]
    assert [int(d) for d in raw.shape] == list(reversed(shape))
    assert raw.tensor_type == get_format(qtype).ggml_type


@pytest.mark.parametrize(
    "dtype, gtype",
    [
        (torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.int32, "I32"),
        (torch.float64, "F64"), (torch.int8, "I8"), (torch.int16, "I16"), (torch.int64, "I64"),
    ],
)
@pytest.mark.parametrize("shape", [(256,), (E, H), (V, KSEL), (2, 3, 5)])
def test_float_round_trip(tmp_path, gen, dtype, gtype, shape):
    if dtype.is_floating_point:
        x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    else:
        x = torch.randint(-100, 100, shape, generator=gen).to(dtype)
    path = tmp_path / "f.gguf"
    write_gguf(path, {"x": x, "y": x.flip(0) + 1}, {})
    f = open_gguf(path)
    got = f.float_tensor("x")
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got, x)
    assert torch.equal(f.float_tensor("y"), x.flip(0) + 1)
    assert f.tensor_type("x") == gtype
    assert torch.equal(f.tensor("x"), x)


def test_ds4_float_layouts(tmp_path, gen):
    """Router F16 GGUF (H, E) -> [E, H]; hash table I32 GGUF (k, V) -> [V, k]."""
    router = torch.randn(E, H, generator=gen).half()
    table = torch.randint(0, E, (V, KSEL), generator=gen, dtype=torch.int32)
    path = tmp_path / "l.gguf"
    write_gguf(path, {"r": router, "t": table}, {})
    raw = {t.name: t for t in GGUFReader(path).tensors}
    assert [int(d) for d in raw["r"].shape] == [H, E]
    assert [int(d) for d in raw["t"].shape] == [KSEL, V]
    f = open_gguf(path)
    assert torch.equal(f.float_tensor("r"), router)
    assert torch.equal(f.float_tensor("t"), table)


def test_writes_from_noncontiguous_input(tmp_path, gen):
    x = torch.randn(8, 6, generator=gen).t()  # not contiguous
    path = tmp_path / "nc.gguf"
    write_gguf(path, {"x": x}, {})
    assert torch.equal(open_gguf(path).float_tensor("x"), x)


def test_metadata_round_trip_and_types(tmp_path):
    md = {
        "a.u": 7, "a.big": 2**40, "a.neg": -3, "a.f": 1.25, "a.b": True, "a.b0": False, "a.s": "héllo",
        "a.empty": "", "a.fa": [10.0, 9.5, 1.0], "a.ia": [1, 2, 3], "a.sa": ["x", "yz"],
        "a.ba": [True, False], "a.mixed": [1, 2.5], "a.np": np.int64(5), "a.npf": np.float32(0.5),
        "a.tens": torch.tensor([1.5, 2.0]),
    }
    path = tmp_path / "m.gguf"
    write_gguf(path, {"x": torch.ones(4)}, md, arch="myarch")
    got = open_gguf(path).metadata
    assert got["general.architecture"] == "myarch"
    want = dict(md, **{"a.mixed": [1.0, 2.5], "a.np": 5, "a.npf": 0.5, "a.tens": [1.5, 2.0]})
    for k, v in want.items():
        assert got[k] == v, k
    assert not any(k.startswith("GGUF.") for k in got)
    fields = GGUFReader(path).fields
    assert fields["a.u"].types == [GGUFValueType.UINT32]
    assert fields["a.neg"].types == [GGUFValueType.INT32]
    assert fields["a.big"].types == [GGUFValueType.UINT64]
    assert fields["a.f"].types == [GGUFValueType.FLOAT32]
    assert fields["a.b"].types == [GGUFValueType.BOOL]
    assert fields["a.fa"].types == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    assert fields["a.ia"].types == [GGUFValueType.ARRAY, GGUFValueType.UINT32]


def test_moe_config(tmp_path, gen):
    cfg = ds4_config()
    path = tmp_path / "c.gguf"
    write_gguf(path, {"x": torch.ones(3)}, cfg.to_metadata())
    got = open_gguf(path).moe_config()
    assert got.arch == "deepseek4"
    assert (got.expert_count, got.expert_used_count, got.expert_feed_forward_length) == (E, KSEL, F)
    assert (got.embedding_length, got.block_count, got.expert_shared_count) == (H, 3, 1)
    assert got.hash_layer_count == 1 and got.vocab_size == V
    assert got.expert_weights_scale == 1.5 and got.expert_weights_norm is True
    assert got.swiglu_clamp_exp == [10.0, 10.0, 10.0]
    assert got.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)
    assert (got.expert_group_count, got.expert_group_used_count) == (0, 0)
    # the exact keys the model files use
    md = open_gguf(path).metadata
    assert md["deepseek4.expert_feed_forward_length"] == F
    assert md["deepseek4.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)


def test_moe_config_missing_keys(tmp_path):
    path = tmp_path / "c.gguf"
    write_gguf(path, {"x": torch.ones(3)}, {"qwen3moe.expert_count": 128, "qwen3moe.swiglu_clamp_exp": 7.0},
               arch="qwen3moe")
    got = open_gguf(path).moe_config()
    assert got.arch == "qwen3moe" and got.expert_count == 128 and got.swiglu_clamp_exp == 7.0
    assert got.expert_used_count is None and got.expert_weights_norm is None and got.block_count is None
    assert got.expert_group_count == 0
    assert open_gguf(path).get_metadata("qwen3moe.expert_count") == 128
    assert open_gguf(path).get_metadata("GGUF.version") is None


# ----------------------------------------------------------------------------- MoE layers


def test_moe_layers_round_trip(tmp_path, gen):
    layers = {
        0: make_layer(gen, hash_layer=True),
        2: make_layer(gen),
        7: make_layer(gen, "Q4_K", "Q4_K", shared=False),
    }
    layers[7].bias = None
    path = tmp_path / "moe.gguf"
    write_moe_layers(path, layers, ds4_config(block_count=8))
    f = open_gguf(path)
    assert f.layers() == [0, 2, 7]
    assert "blk.0.ffn_gate_tid2eid.weight" in f and "blk.2.ffn_gate_tid2eid.weight" not in f
    assert "blk.7.ffn_gate_shexp.weight" not in f and "blk.7.exp_probs_b.bias" not in f
    # the metadata says every layer has a shared expert: layer 7 without one is refused unless asked
    with pytest.raises(GGUFError, match=r"blk\.7: deepseek4\.expert_shared_count = 1 but .*ffn_gate_shexp"):
        f.moe_layer(7)
    for L, want in layers.items():
        got = f.moe_layer(L, check_config=L != 7)
        for field, name in layer_tensor_names(L).items():
            w, g = getattr(want, field), getattr(got, field)
            assert (w is None) == (g is None), name
            if isinstance(w, QuantTensor):
                assert g.qtype == w.qtype and g.shape == w.shape and torch.equal(g.data, w.data), name
            elif w is not None:
                assert g.dtype == w.dtype and torch.equal(g, w), name
    assert f.moe_layer(0).gate.qtype == "IQ2_XXS" and f.moe_layer(0).down.qtype == "Q2_K"
    assert set(f.tensor_names()) >= {"blk.2.ffn_up_exps.weight", "blk.2.ffn_down_shexp.weight"}


def test_write_moe_layers_derives_config(tmp_path, gen):
    path = tmp_path / "moe.gguf"
    cfg = write_moe_layers(path, {1: make_layer(gen, hash_layer=True), "mtp.0": make_layer(gen)})
    assert (cfg.expert_count, cfg.embedding_length, cfg.expert_feed_forward_length) == (E, H, F)
    assert cfg.expert_used_count == KSEL and cfg.block_count == 2
    f = open_gguf(path)
    assert f.moe_config().expert_count == E
    assert f.layers() == [1]
    assert f.moe_layer("mtp.0").router.shape == (E, H)


def test_moe_layer_mismatched_gate_up_types(tmp_path, gen):
    lt = make_layer(gen)
    t = lt.to_tensors(0)
    t["blk.0.ffn_up_exps.weight"] = rand_qt("Q4_K", (E, F, H), gen)
    path = tmp_path / "bad.gguf"
    write_gguf(path, t, {})
    with pytest.raises(ValueError, match=r"gate and up must share a quant type.*IQ2_XXS.*Q4_K"):
        open_gguf(path).moe_layer(0)


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("blk.0.ffn_up_exps.weight", (E, 2 * F, H), "up shape"),
        ("blk.0.ffn_down_exps.weight", (E, H, 2 * F), "down shape"),
        ("blk.0.ffn_down_exps.weight", (E + 1, H, F), "down shape"),
        ("blk.0.ffn_gate_inp.weight", (E + 1, H), "router shape"),
        ("blk.0.exp_probs_b.bias", (E + 1,), "bias shape"),
        ("blk.0.ffn_norm.weight", (2 * H,), "ffn_norm shape"),
        ("blk.0.ffn_down_shexp.weight", (H, 2 * F), "shared shapes"),
    ],
)
def test_moe_layer_shape_errors(tmp_path, gen, name, shape, match):
    t = make_layer(gen).to_tensors(0)
    old = t[name]
    if isinstance(old, QuantTensor):
        t[name] = rand_qt(old.qtype, shape, gen)
    else:
        t[name] = torch.randn(shape, generator=gen).to(old.dtype)
    path = tmp_path / "bad.gguf"
    write_gguf(path, t, {})
    with pytest.raises(ValueError, match=match):
        open_gguf(path).moe_layer(0)


def test_moe_layer_partial_shared_and_bad_hash(tmp_path, gen):
    t = make_layer(gen).to_tensors(0)
    del t["blk.0.ffn_up_shexp.weight"]
    path = tmp_path / "a.gguf"
    write_gguf(path, t, {})
    with pytest.raises(ValueError, match="shared expert needs gate, up and down"):
        open_gguf(path).moe_layer(0)

    t = make_layer(gen, hash_layer=True).to_tensors(0)
    tab = t["blk.0.ffn_gate_tid2eid.weight"].clone()
    tab[V // 2, 1] = E  # one id past the last expert
    t["blk.0.ffn_gate_tid2eid.weight"] = tab
    write_gguf(path, t, {})
    with pytest.raises(ValueError, match=r"tid2eid.*expected 0\.\.3"):
        open_gguf(path).moe_layer(0)


def test_moe_layer_disagrees_with_metadata(tmp_path, gen):
    t = make_layer(gen).to_tensors(0)
    path = tmp_path / "a.gguf"
    write_gguf(path, t, ds4_config(expert_count=8).to_metadata())
    with pytest.raises(ValueError, match=r"expert_count = 8 but the tensors have E = 4"):
        open_gguf(path).moe_layer(0)
    assert open_gguf(path).moe_layer(0, check_config=False).num_experts == E
    with pytest.raises(ValueError, match=r"embedding_length = 1024 but the tensors have H = 512"):
        write_moe_layers(path, {0: make_layer(gen)}, ds4_config(embedding_length=1024))


def test_moe_layer_missing_required_tensor(tmp_path, gen):
    t = make_layer(gen).to_tensors(3)
    del t["blk.3.ffn_down_exps.weight"]
    path = tmp_path / "a.gguf"
    write_gguf(path, t, {})
    with pytest.raises(KeyError, match=r"blk\.3\.ffn_down_exps\.weight.*blk\.3\.ffn_gate_exps\.weight"):
        open_gguf(path).moe_layer(3)


# ----------------------------------------------------------------------------- zero copy


def test_reads_are_views_of_the_mapped_file(tmp_path, gen):
    qt = rand_qt("Q4_K", (E, 32, 512), gen)
    x = torch.randn(E, H, generator=gen)
    path = tmp_path / "z.gguf"
    write_gguf(path, {"q": qt, "x": x}, {})
    f = open_gguf(path)
    mm = f._reader.data
    base, size = mm.ctypes.data, mm.nbytes
    q1, q2 = f.quant_tensor("q"), f.quant_tensor("q")
    raw = {t.name: t for t in f._reader.tensors}
    assert q1.data.data_ptr() == base + raw["q"].data_offset
    assert q1.data.data_ptr() == q2.data.data_ptr()
    xr = f.float_tensor("x")
    assert base <= xr.data_ptr() < base + size
    # copy-on-write: writing into a returned tensor changes neither the file nor other readers
    q1.data[0, 0, 0] ^= 0xFF
    assert q2.data[0, 0, 0] == q1.data[0, 0, 0]  # same mapping in this process
    assert torch.equal(open_gguf(path).quant_tensor("q").data, qt.data)


def test_closed_file(tmp_path):
    path = tmp_path / "c.gguf"
    write_gguf(path, {"x": torch.arange(5, dtype=torch.int32)}, {})
    with open_gguf(path) as f:
        x = f.float_tensor("x")
    assert x.tolist() == [0, 1, 2, 3, 4]  # tensors outlive the file object
    with pytest.raises(ValueError, match="closed"):
        f.metadata  # noqa: B018
    with pytest.raises(ValueError, match="closed"):
        f.float_tensor("x")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_round_trip(tmp_path, gen):
    lt = make_layer(gen, hash_layer=True).to("cuda")
    path = tmp_path / "cuda.gguf"
    write_moe_layers(path, {0: lt})
    got = open_gguf(path).moe_layer(0, device="cuda")
    assert got.down.device.type == "cuda" and torch.equal(got.down.data, lt.down.data)
    assert torch.equal(got.tid2eid, lt.tid2eid)


def test_to_device_argument(tmp_path, gen):
    path = tmp_path / "d.gguf"
    write_moe_layers(path, {0: make_layer(gen)})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lt = open_gguf(path).moe_layer(0, device=dev)
    assert lt.gate.device.type == dev and lt.router.device.type == dev


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        open_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize(
    "content", [b"GGML" + bytes(100), b"\x00" * 64, b"hello world, not gguf", b"PK\x03\x04"]
)
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(path)


def test_empty_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(path)


def _valid_file(tmp_path, gen):
    path = tmp_path / "full.gguf"
    write_moe_layers(path, {0: make_layer(gen, hash_layer=True)}, ds4_config())
    blob = path.read_bytes()
    r = GGUFReader(path)
    data_start = r.data_offset
    data_end = max(t.data_offset + t.n_bytes for t in r.tensors)  # bytes past this are padding
    return blob, data_start, data_end


def test_truncated_in_header(tmp_path, gen):
    blob, data_start, _ = _valid_file(tmp_path, gen)
    path = tmp_path / "cut.gguf"
    for cut in range(1, data_start + 1):  # every cut inside the header, and right at its end
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            GGUFFile(path)


def test_truncated_in_data(tmp_path, gen):
    blob, data_start, data_end = _valid_file(tmp_path, gen)
    path = tmp_path / "cut.gguf"
    r = GGUFReader(tmp_path / "full.gguf")
    # into each tensor's first and last bytes, plus a stride through the data
    cuts = {c for t in r.tensors for c in (t.data_offset + 1, t.data_offset + t.n_bytes - 1)}
    cuts = sorted(cuts | set(range(data_start + 7, data_end, (data_end - data_start) // 40)))
    del r
    for cut in cuts:
        path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            GGUFFile(path)
    path.write_bytes(blob[:data_end])  # only the final alignment padding is gone: still complete
    full = GGUFFile(tmp_path / "full.gguf").moe_layer(0).down.data
    assert torch.equal(GGUFFile(path).moe_layer(0).down.data, full)


def test_corrupt_tensor_info(tmp_path, gen):
    blob, _, _ = _valid_file(tmp_path, gen)
    path = tmp_path / "bad.gguf"
    for mutate in ("offset", "dims", "zero_dim", "type"):
        path.write_bytes(blob)
        r = GGUFReader(path, mode="r+")
        t = r.tensors[-1]
        _, _, _, dims, raw_type, offset = t.field.parts
        if mutate == "offset":
            offset[0] = 1 << 40
        elif mutate == "dims":
            dims[-1] = 1 << 20
        elif mutate == "zero_dim":  # gguf's reader accepts this (an empty tensor); we must not
            dims[-1] = 0
        else:
            raw_type[0] = 250  # no such GGML type
        r.data.flush()
        del r, t, dims, raw_type, offset
        with pytest.raises(ValueError, match="corrupt"):
            GGUFFile(path)


# ----------------------------------------------------------------------------- structure checks
# Byte surgery on a valid file: each helper returns the positions of one header field.


def _tensor_info(blob: bytes, name: str) -> dict[str, int]:
    """Byte offsets of the n_dims, type and offset fields of tensor ``name``'s info."""
    key = len(name).to_bytes(8, "little") + name.encode()
    at = blob.index(key) + len(key)
    n_dims = int.from_bytes(blob[at : at + 4], "little")
    return {"n_dims": at, "dims": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 8 + 8 * n_dims}


def _kv_value(blob: bytes, key: str) -> int:
    """Byte offset of the value type (u32) of metadata ``key``; the value follows it."""
    k = len(key).to_bytes(8, "little") + key.encode()
    return blob.index(k) + len(k)


def _put(blob: bytes, at: int, value: int, n: int) -> bytes:
    return blob[:at] + (value % (1 << (8 * n))).to_bytes(n, "little") + blob[at + n :]


def _load_fails(tmp_path, blob: bytes, match: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(GGUFError, match=match):
        open_gguf(path).moe_layer(0)


def test_type_change_that_overlaps_the_next_tensor(tmp_path, gen):
    blob, _, _ = _valid_file(tmp_path, gen)
    at = _tensor_info(blob, "blk.0.ffn_gate_exps.weight")["type"]
    bad = _put(blob, at, int(GGMLQuantizationType.Q4_K), 4)  # 144 B per block instead of 66
    _load_fails(tmp_path, bad, r"'blk\.0\.ffn_up_exps\.weight' starts at byte \d+, expected byte \d+")


def test_type_change_that_shrinks_a_tensor_inside_its_padding(tmp_path, gen):
    # bias f32 [4] is 16 bytes in a 32-byte slot: as f16 it is 8 bytes and the next offset still fits
    blob, _, _ = _valid_file(tmp_path, gen)
    bad = _put(blob, _tensor_info(blob, "blk.0.exp_probs_b.bias")["type"], int(GGMLQuantizationType.F16), 4)
    _load_fails(tmp_path, bad, r"padding after tensor 'blk\.0\.exp_probs_b\.bias' .* is not zeros")


@pytest.mark.filterwarnings("error")  # 2^64-1 must be refused before gguf's reader overflows on it
@pytest.mark.parametrize("how", ["misaligned", "into_previous", "max", "gap"])
def test_bad_tensor_offset(tmp_path, gen, how):
    blob, _, _ = _valid_file(tmp_path, gen)
    r = GGUFReader(tmp_path / "full.gguf")
    t = r.tensors[2]
    rel = t.data_offset - r.data_offset  # the file stores offsets relative to the data section
    new = {"misaligned": rel + 1, "into_previous": r.tensors[1].data_offset - r.data_offset,
           "max": 2**64 - 1, "gap": rel + 32}[how]
    del r, t
    bad = _put(blob, _tensor_info(blob, "blk.0.ffn_down_exps.weight")["offset"], new, 8)
    _load_fails(tmp_path, bad, r"tensor 'blk\.0\.ffn_down_exps\.weight' starts at (data offset|byte)")


def test_changed_alignment(tmp_path, gen):
    path = tmp_path / "a.gguf"
    write_gguf(path, make_layer(gen).to_tensors(0), {**ds4_config(hash_layer_count=0).to_metadata(),
                                                     "general.alignment": 64})
    blob = path.read_bytes()
    assert GGUFReader(path).alignment == 64
    open_gguf(path).moe_layer(0)  # valid as written
    at = _kv_value(blob, "general.alignment") + 4
    for align in (32, 128, 16, 48, 0):
        _load_fails(tmp_path, _put(blob, at, align, 4), r"general\.alignment|starts at byte|corrupt")
    with pytest.raises(ValueError, match="power of two"):
        write_gguf(path, {"x": torch.ones(3)}, {"general.alignment": 48})


@pytest.mark.parametrize(
    "delta, match",
    [
        (-1, "the tensor count or general.alignment does not match"),  # the last info is left over
        (-2, "the tensor count or general.alignment does not match"),
        (1, r"name of tensor #\d+ claims \d+ bytes"),  # tensor data read as one more info
        (1 << 33, "tensors cannot fit in the file"),
    ],
)
def test_tensor_count_field_disagrees_with_infos(tmp_path, gen, delta, match):
    blob, _, _ = _valid_file(tmp_path, gen)
    n = int.from_bytes(blob[8:16], "little")
    path = tmp_path / "bad.gguf"
    path.write_bytes(_put(blob, 8, n + delta, 8))
    with pytest.raises(GGUFError, match=match):
        open_gguf(path)


def _finish(w: GGUFWriter) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close it (files the writers of
    moetile.gguf_io would refuse to make)."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_alignment_not_a_power_of_two(tmp_path, gen):
    # laid out consistently at 48 bytes, which GGUF (and llama.cpp) do not allow
    path = tmp_path / "a48.gguf"
    w = GGUFWriter(path, "deepseek4")
    w.data_alignment = 48
    w.add_uint32("general.alignment", 48)
    w.add_tensor("x", np.ones(3, dtype=np.float32))
    w.add_tensor("y", np.ones(5, dtype=np.float32))
    _finish(w)
    with pytest.raises(GGUFError, match=r"general\.alignment = 48 \(type 4\) is not a power of two"):
        open_gguf(path)


@pytest.mark.parametrize("field", ["bias", "tid2eid", "shared_up", "ffn_norm", "gate"])
def test_damaged_layer_tensor_name_is_not_dropped(tmp_path, gen, field):
    blob, _, _ = _valid_file(tmp_path, gen)
    name = layer_tensor_names(0)[field].encode()
    at = blob.index(name) + len(name) - 3  # one letter of "...ght" / "...ias"
    bad = blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]
    _load_fails(tmp_path, bad, rf"no tensor '{layer_tensor_names(0)[field]}' \({field}\).*one character away")


def test_other_layers_are_not_mistaken_for_damage(tmp_path, gen):
    # blk.1 holds a hash table and blk.0 does not: not a damaged name
    path = tmp_path / "two.gguf"
    write_moe_layers(path, {0: make_layer(gen), 1: make_layer(gen, hash_layer=True)}, ds4_config(hash_layer_count=0))
    f = open_gguf(path)
    assert f.moe_layer(0).tid2eid is None and f.moe_layer(1).tid2eid is not None


def test_metadata_says_the_layer_has_a_tensor_it_lacks(tmp_path, gen):
    path = tmp_path / "a.gguf"
    write_moe_layers(path, {0: make_layer(gen, hash_layer=False)}, ds4_config(hash_layer_count=1))
    with pytest.raises(GGUFError, match=r"hash_layer_count = 1 but .*'blk\.0\.ffn_gate_tid2eid\.weight'"):
        open_gguf(path).moe_layer(0)
    assert open_gguf(path).moe_layer(0, check_config=False).tid2eid is None


def test_huge_metadata_array_fails_before_allocating(tmp_path, gen):
    blob, _, _ = _valid_file(tmp_path, gen)
    at = _kv_value(blob, "deepseek4.swiglu_clamp_exp")
    assert int.from_bytes(blob[at : at + 4], "little") == int(GGUFValueType.ARRAY)
    bad = _put(blob, at + 8, 1 << 40, 8)  # after the element type: the element count
    t0 = time.perf_counter()
    _load_fails(tmp_path, bad, r"'deepseek4\.swiglu_clamp_exp' claims 1099511627776 elements.*at byte")
    assert time.perf_counter() - t0 < 5


def test_invalid_utf8_in_metadata_string(tmp_path, gen):
    blob, _, _ = _valid_file(tmp_path, gen)
    at = _kv_value(blob, "general.architecture") + 4 + 8  # type, length, then the text
    _load_fails(tmp_path, blob[:at] + b"\xff" + blob[at + 1 :], r"'general\.architecture' is not UTF-8")


def test_invalid_utf8_in_tensor_name(tmp_path, gen):
    blob, _, _ = _valid_file(tmp_path, gen)
    at = blob.index(b"blk.0.ffn_down_exps")
    _load_fails(tmp_path, blob[:at] + b"\xc3" + blob[at + 1 :], r"name of tensor #\d+ is not UTF-8")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "SIGALRM"), reason="needs FIFOs and SIGALRM")
def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.gguf"
    os.mkfifo(path)

    def hang(signum, frame):
        raise TimeoutError("opening a FIFO blocked")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        with pytest.raises(GGUFError, match="not a regular file"):
            open_gguf(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_read_only_map_hands_out_writable_copies(tmp_path, gen):
    blob, _, _ = _valid_file(tmp_path, gen)
    path = tmp_path / "full.gguf"
    lt = open_gguf(path, mode="r").moe_layer(0)
    lt.bias.fill_(7.0)  # would fault on a read-only page
    lt.gate.data.zero_()
    assert path.read_bytes() == blob
    assert not torch.equal(open_gguf(path, mode="r").moe_layer(0).bias, lt.bias)
    with pytest.raises(ValueError, match="mode must be"):
        open_gguf(path, mode="r+")


def test_missing_tensor_names_it_and_lists_others(tmp_path, gen):
    path = tmp_path / "m.gguf"
    write_gguf(path, {"blk.0.ffn_up_exps.weight": rand_qt("Q4_K", (E, F, H), gen), "tok": torch.ones(4)}, {})
    f = open_gguf(path)
    for getter in (f.quant_tensor, f.float_tensor, f.tensor_type):
        with pytest.raises(TensorNotFoundError, match=r"'blk\.0\.ffn_gate_exps\.weight'.*blk\.0\.ffn_up"):
            getter("blk.0.ffn_gate_exps.weight")
    with pytest.raises(KeyError, match=r"no tensor named 'nothing'.*2 tensors"):
        f.quant_tensor("nothing")


def test_unsupported_quant_type(tmp_path):
    path = tmp_path / "q5.gguf"
    w = GGUFWriter(path, "deepseek4")
    raw = np.random.default_rng(0).integers(0, 256, size=(32, 176), dtype=np.uint8)  # Q5_K: 176 B / 256
    w.add_tensor("blk.0.ffn_gate_exps.weight", raw, raw_dtype=GGMLQuantizationType.Q5_K)
    _finish(w)
    f = open_gguf(path)
    with pytest.raises(GGUFError, match=r"layer 0 holds \['blk\.0\.ffn_gate_exps'\] but no"):
        f.layers()
    with pytest.raises(ValueError, match=r"Q5_K.*not support"):
        f.quant_tensor("blk.0.ffn_gate_exps.weight")
    with pytest.raises(ValueError, match="Q5_K"):
        f.float_tensor("blk.0.ffn_gate_exps.weight")


def test_wrong_accessor(tmp_path, gen):
    path = tmp_path / "w.gguf"
    write_gguf(path, {"f": torch.ones(4, 256), "q": rand_qt("Q8_0", (4, 256), gen)}, {})
    f = open_gguf(path)
    with pytest.raises(ValueError, match=r"'f' is F32, not quantized"):
        f.quant_tensor("f")
    with pytest.raises(ValueError, match=r"'q' is Q8_0"):
        f.float_tensor("q")


def test_write_rejects_bad_input(tmp_path, gen):
    path = tmp_path / "w.gguf"
    with pytest.raises(TypeError, match=r"'b'.*torch.bool"):
        write_gguf(path, {"b": torch.ones(3, dtype=torch.bool)}, {})
    with pytest.raises(ValueError, match="empty array"):
        write_gguf(path, {"x": torch.ones(3)}, {"k": []})
    with pytest.raises(TypeError, match="unsupported value type"):
        write_gguf(path, {"x": torch.ones(3)}, {"k": {"a": 1}})
    with pytest.raises(ValueError, match="at most 63 bytes"):
        write_gguf(path, {"x" * 64: torch.ones(3)}, {})
    with pytest.raises(ValueError, match="general.architecture"):
        write_gguf(path, {"x": torch.ones(3)}, {"general.architecture": "llama"}, arch="deepseek4")
    with pytest.raises(ValueError, match="1 to 4 dims"):
        write_gguf(path, {"x": torch.tensor(1.0)}, {})
    assert not path.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_layer_tensors_validate_on_construction(gen):
    good = make_layer(gen)
    with pytest.raises(ValueError, match=r"gate and up must share a quant type"):
        MoELayerTensors(good.gate, rand_qt("Q4_K", (E, F, H), gen), good.down, good.router)
    with pytest.raises(ValueError, match=r"down shape \(4, 256, 512\) must be \(E, H, F\) = \(4, 512, 256\)"):
        MoELayerTensors(good.gate, good.up, rand_qt("Q2_K", (E, F, H), gen), good.router)
    with pytest.raises(ValueError, match="tid2eid must be an int32"):
        MoELayerTensors(good.gate, good.up, good.down, good.router, tid2eid=torch.zeros(V, KSEL))
    with pytest.raises(TypeError, match="gate must be a QuantTensor"):
        MoELayerTensors(good.gate.data, good.up, good.down, good.router)


# ----------------------------------------------------------------------------- structure (fuzzing finds)


def test_bytes_after_the_last_tensor(tmp_path, gen):
    blob, _, _ = _valid_file(tmp_path, gen)
    _load_fails(tmp_path, blob + bytes(64), r"64 bytes after the end of the last tensor")
    last = GGUFReader(tmp_path / "full.gguf").tensors[-1]
    assert last.tensor_type == GGMLQuantizationType.F32 and last.n_bytes >= 64  # halved, it leaves >= 32 bytes
    bad = _put(blob, _tensor_info(blob, last.name)["type"], int(GGMLQuantizationType.F16), 4)
    _load_fails(tmp_path, bad, rf"bytes after the end of the last tensor, '{last.name}'")
    path = tmp_path / "empty.gguf"  # no tensors, and bytes where none can be
    write_gguf(path, {}, {"general.architecture": "deepseek4"})
    path.write_bytes(path.read_bytes() + bytes(range(200)))
    with pytest.raises(GGUFError, match=r"bytes after the end of the header \(no tensors\)"):
        open_gguf(path)


def test_layer_missing_one_expert_stack_is_named(tmp_path, gen):
    path = tmp_path / "two.gguf"
    write_moe_layers(path, {0: make_layer(gen), 1: make_layer(gen)})
    blob = path.read_bytes()
    at = blob.index(b"blk.1.ffn_gate_exps") + 9  # blk.1.ffn_gate -> blk.1.ffn_^ate: the gate drops out
    path.write_bytes(blob[:at] + b"^" + blob[at + 1 :])
    with pytest.raises(GGUFError, match=r"layer 1 holds \['blk\.1\.ffn_down_exps', 'blk\.1\.ffn_up_exps'\] but no "
                                        r"\['blk\.1\.ffn_gate_exps\.weight'\]"):
        open_gguf(path).layers()


def test_files_without_separate_gate_stacks_have_no_layers(tmp_path, gen):
    """Merged gate_up experts (llama.cpp's ffn_gate_up_exps) or ungated ones: no layer moetile reads,
    not a damaged file."""
    layer = make_layer(gen, shared=False)
    for names in ({"blk.0.ffn_gate_up_exps.weight": layer.gate, "blk.0.ffn_down_exps.weight": layer.down},
                  {"blk.0.ffn_up_exps.weight": layer.up, "blk.0.ffn_down_exps.weight": layer.down}):
        path = tmp_path / "m.gguf"
        write_gguf(path, names)
        assert open_gguf(path).layers() == []


@pytest.mark.parametrize("index", ["00", "\u0661", "1\n"])
def test_layer_index_that_is_not_plain_decimal(tmp_path, gen, index):
    path = tmp_path / "odd.gguf"
    write_gguf(path, make_layer(gen, shared=False).to_tensors(f"blk.{index}"))
    with pytest.raises(GGUFError, match="is not a plain decimal number"):
        open_gguf(path).layers()


def test_hash_table_shorter_than_the_vocabulary(tmp_path, gen):
    path = tmp_path / "h.gguf"
    layer, cfg = make_layer(gen, hash_layer=True), ds4_config(vocab_size=V + 10)
    match = rf"vocab_size = {V + 10} but the hash table tid2eid has V = {V} rows"
    with pytest.raises(ValueError, match=match):  # the writer refuses it
        write_moe_layers(path, {0: layer}, cfg)
    write_gguf(path, layer.to_tensors(0), cfg.to_metadata())  # and so does the reader
    with pytest.raises(ValueError, match=match):
        open_gguf(path).moe_layer(0)


def test_architecture_that_is_not_a_string(tmp_path, gen):
    path = tmp_path / "a.gguf"
    w = GGUFWriter(path, "deepseek4")
    w.add_array("general.architecture", [1, 2])  # replaces the string the writer was given
    _finish(w)
    f = open_gguf(path)
    with pytest.raises(GGUFError, match=r"'general\.architecture' is \[1, 2\], not a string"):
        f.moe_config()


def test_nested_metadata_arrays_and_big_endian_are_refused(tmp_path):
    path = tmp_path / "n.gguf"
    w = GGUFWriter(path, "deepseek4")
    w.add_array("x.nested", [[1, 2], [3]])
    _finish(w)
    with pytest.raises(GGUFError, match=r"metadata 'x\.nested' is an array of arrays"):
        open_gguf(path)
    path = tmp_path / "be.gguf"
    write_gguf(path, {"x": torch.ones(8)})
    blob = path.read_bytes()
    path.write_bytes(blob[:4] + blob[4:8][::-1] + blob[8:])
    with pytest.raises(GGUFError, match="big-endian GGUF"):
        open_gguf(path)


def test_writer_refuses_what_its_reader_would(tmp_path):
    """What write_gguf / write_moe_layers would write but not read back, or would write wrongly, is
    refused up front, naming the key, tensor or layer: colliding layer keys (0 and "blk.0": one layer
    silently replaced the other), negative layer indices, reserved GGUF.* keys, tensors of more than
    4 dims, an alignment beyond 65536 (2**31 wrote a 6 GiB file), floats beyond float32 and strings
    that are not UTF-8."""
    gen = torch.Generator().manual_seed(40)
    lt = make_layer(gen)
    p = tmp_path / "w.gguf"
    with pytest.raises(ValueError, match="another key already wrote"):
        write_moe_layers(p, {0: lt, "blk.0": make_layer(gen)})
    with pytest.raises(ValueError, match=">= 0"):
        write_moe_layers(p, {-1: lt})
    t = {"a": torch.ones(4)}
    with pytest.raises(ValueError, match="reserved"):
        write_gguf(p, t, {"GGUF.version": 3})
    with pytest.raises(ValueError, match="1 to 4 dims"):
        write_gguf(p, {"a": torch.ones(1, 1, 1, 1, 2)})
    with pytest.raises(ValueError, match="alignment"):
        write_gguf(p, t, {"general.alignment": 2**17})
    with pytest.raises(ValueError, match="'x.f'.*beyond float32"):
        write_gguf(p, t, {"x.f": 1e39})
    with pytest.raises(ValueError, match="'x.l'.*beyond float32"):
        write_gguf(p, t, {"x.l": [1.0, -1e39]})
    with pytest.raises(ValueError, match="'x.s'.*UTF-8"):
        write_gguf(p, t, {"x.s": "a\ud800"})
    assert not p.exists() and not list(tmp_path.glob(".*tmp"))
    write_gguf(p, t, {"general.alignment": 2**16, "x.f": 3.0e38})  # the limits themselves are fine
    assert open_gguf(p).tensor("a").tolist() == [1.0] * 4
