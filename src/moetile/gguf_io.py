"""Read and write the routed-MoE tensors of a GGUF file (ds4 / llama.cpp names).

Shapes: E experts, H hidden size, F expert FFN width, V vocabulary, k experts per token.
GGUF lists dimensions fastest-first; here every shape is row-major (slowest-first), so the
GGUF tensor ``(4096, 2048, 256)`` is the logical ``(E=256, N=2048, K=4096)``.

Reading is zero-copy: ``GGUFFile`` maps the file (``np.memmap``) and returns torch tensors
over the mapped bytes. The map is copy-on-write by default, so writing into a returned
tensor changes only this process's copy, never the file.

Per-layer names (``L`` is the block index; ``mtp.0`` blocks use the same suffixes)::

    blk.L.ffn_gate_exps.weight   routed gate  QuantTensor (E, F, H)
    blk.L.ffn_up_exps.weight     routed up    QuantTensor (E, F, H), same qtype as gate
    blk.L.ffn_down_exps.weight   routed down  QuantTensor (E, H, F)
    blk.L.ffn_gate_inp.weight    router       f16/f32 [E, H]
    blk.L.exp_probs_b.bias       bias         f32 [E]          (optional)
    blk.L.ffn_gate_tid2eid.weight hash table  i32 [V, k]       (optional, hash layers)
    blk.L.ffn_{gate,up}_shexp.weight          QuantTensor (Fs, H) (optional, together
    blk.L.ffn_down_shexp.weight               QuantTensor (H, Fs)  with each other)
    blk.L.ffn_norm.weight        RMSNorm      f32 [H]          (optional)
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .devices import resolve
from .quant import FORMATS, QTYPES, QuantTensor

__all__ = [
    "GGUFError",
    "GGUFFile",
    "MoEConfig",
    "MoELayerTensors",
    "TensorNotFoundError",
    "layer_tensor_names",
    "open_gguf",
    "write_gguf",
    "write_moe_layer",
    "write_moe_layers",
]

_MAGIC = b"GGUF"
_MIN_HEADER = 24  # magic, version (u32), tensor count and kv count (u64 each)
_MAX_NAME_BYTES = 63  # llama.cpp's GGML_MAX_NAME is 64 including the NUL

# Unquantized GGML types <-> torch dtypes. BF16 has no numpy dtype: it travels as int16 bits.
_PLAIN_TO_TORCH = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
    GGMLQuantizationType.F64: torch.float64,
    GGMLQuantizationType.I8: torch.int8,
    GGMLQuantizationType.I16: torch.int16,
    GGMLQuantizationType.I32: torch.int32,
    GGMLQuantizationType.I64: torch.int64,
}
_TORCH_TO_PLAIN = {v: k for k, v in _PLAIN_TO_TORCH.items()}

# suffix after "blk.L." for each MoELayerTensors field
_LAYER_NAMES = {
    "gate": "ffn_gate_exps.weight",
    "up": "ffn_up_exps.weight",
    "down": "ffn_down_exps.weight",
    "router": "ffn_gate_inp.weight",
    "bias": "exp_probs_b.bias",
    "tid2eid": "ffn_gate_tid2eid.weight",
    "shared_gate": "ffn_gate_shexp.weight",
    "shared_up": "ffn_up_shexp.weight",
    "shared_down": "ffn_down_shexp.weight",
    "ffn_norm": "ffn_norm.weight",
}
_SHARED = ("shared_gate", "shared_up", "shared_down")
_EXPS_RE = re.compile(r"blk\.([^.]*)\.ffn_(gate|up|down)_exps\.weight", re.S)  # fullmatch
_INDEX_RE = re.compile(r"0|[1-9][0-9]*")  # fullmatch: ASCII digits, no leading zero


class GGUFError(ValueError):
    """A file that is not a well-formed GGUF file; the message names the file, the field or tensor
    and the byte offset."""


# bytes of each scalar GGUF value type (GGUFValueType: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32,
# 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64)
_VALUE_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UINT32, _STRING, _ARRAY = 4, 8, 9
_INT_TYPES = {GGUFValueType[n] for n in ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
# the GGUF value type each MoEConfig field must have (the others are counts: "uint")
_CONFIG_KIND = {"expert_weights_scale": "float", "rms_norm_eps": "float", "expert_weights_norm": "bool",
                "swiglu_clamp_exp": "floats"}
_KIND_TEXT = {"uint": "an integer", "float": "a float", "bool": "a bool", "floats": "a float or an array of floats"}


def _scan_header(path: Path, size: int) -> int:
    """Walk the GGUF header of ``path`` with every count and length bounded by the bytes left,
    before gguf's reader allocates anything (a count of 2^40 elements fails here at once instead
    of exhausting memory); keys, names and string values must be UTF-8. Returns the byte offset
    where the tensor infos end. Raises GGUFError naming the field and the offset."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        off = 0

        def fail(what: str, at: int) -> GGUFError:
            return GGUFError(f"{path}: truncated or corrupt GGUF header: {what} (at byte {at} of {size})")

        def u(fmt: str, what: str) -> int:
            nonlocal off
            n = struct.calcsize(fmt)
            if off + n > size:
                raise fail(f"{what} runs past the end of the file", off)
            (v,) = struct.unpack_from("<" + fmt, mm, off)
            off += n
            return v

        def text(what: str) -> str:
            nonlocal off
            at = off
            n = u("Q", f"length of {what}")
            if n > size - off:
                raise fail(f"{what} claims {n} bytes, more than the {size - off} left", at)
            raw = mm[off : off + n]
            off += n
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise fail(f"{what} is not UTF-8 ({exc.reason} at its byte {exc.start})", at) from None

        def value(vtype: int, what: str) -> None:
            nonlocal off
            if vtype in _VALUE_BYTES:
                if off + _VALUE_BYTES[vtype] > size:
                    raise fail(f"{what} runs past the end of the file", off)
                off += _VALUE_BYTES[vtype]
            elif vtype == _STRING:
                text(what)
            elif vtype == _ARRAY:
                at = off
                etype = u("I", f"element type of {what}")
                count = u("Q", f"length of {what}")
                if etype == _ARRAY:  # gguf's reader flattens them, llama.cpp refuses them: never silently
                    raise fail(f"{what} is an array of arrays, which moetile does not read", at)
                smallest = 8 if etype == _STRING else _VALUE_BYTES.get(etype)
                if smallest is None:
                    raise fail(f"{what} has unknown element type {etype}", at)
                if count > (size - off) // smallest:
                    raise fail(f"{what} claims {count} elements, more than the {size - off} bytes left can hold", at)
                if etype in _VALUE_BYTES:
                    off += count * smallest
                else:
                    for i in range(count):
                        text(f"{what}[{i}]")
            else:
                raise fail(f"{what} has unknown value type {vtype}", off - 4)

        if mm[:4] != _MAGIC:
            raise fail(f"magic {bytes(mm[:4])!r}, expected {_MAGIC!r}", 0)
        off = 4
        version = u("I", "version")
        if version in (2 << 24, 3 << 24):
            raise fail("big-endian GGUF (version bytes swapped); moetile reads little-endian files", 4)
        if version not in (2, 3):
            raise fail(f"version {version}; moetile reads GGUF versions 2 and 3", 4)
        n_tensors = u("Q", "tensor count")
        n_kv = u("Q", "metadata count")
        if n_kv > (size - off) // 13 or n_tensors > (size - off) // 25:  # smallest kv / tensor info
            raise fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the file", 8)
        for i in range(n_kv):
            key = text(f"metadata key #{i}")
            at = off
            vtype = u("I", f"type of {key!r}")
            if key == "general.alignment":  # it places every tensor: check it before the reader uses it
                align = u("I", "general.alignment") if vtype == _UINT32 else None
                if align is None or align <= 0 or align & (align - 1):
                    raise fail(f"general.alignment = {align} (type {vtype}) is not a power of two in a uint32", at)
            else:
                value(vtype, f"metadata {key!r}")
        valid_types = {int(t) for t in GGMLQuantizationType}
        for i in range(n_tensors):
            name = text(f"name of tensor #{i}")
            at = off
            n_dims = u("I", f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= 4:
                raise fail(f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)", at)
            for _ in range(n_dims):
                u("Q", f"dimensions of tensor {name!r}")
            at = off
            if u("I", f"type of tensor {name!r}") not in valid_types:
                raise fail(f"tensor {name!r} has an unknown GGML type", at)
            at = off
            rel = u("Q", f"offset of tensor {name!r}")
            if rel >= size:  # checked here so that gguf's reader never adds past 2^64
                raise fail(f"tensor {name!r} starts at data offset {rel}, past the end of the file", at)
        return off


class TensorNotFoundError(KeyError):
    """A tensor name the file does not hold (a KeyError with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _prefix(layer: int | str) -> str:
    """``blk.L`` for an int layer index; a str (e.g. ``"mtp.0"``) is used as is."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer, str)):
        raise TypeError(f"layer must be an int index or a name prefix such as 'mtp.0', got {layer!r}")
    return layer if isinstance(layer, str) else f"blk.{int(layer)}"


def layer_tensor_names(layer: int | str) -> dict[str, str]:
    """GGUF tensor name of each MoELayerTensors field of ``layer``."""
    p = _prefix(layer)
    return {field: f"{p}.{suffix}" for field, suffix in _LAYER_NAMES.items()}


# --------------------------------------------------------------------------- config


@dataclass
class MoEConfig:
    """MoE hyper-parameters, one per ``{arch}.<field>`` metadata key (None when absent).

    ``rms_norm_eps`` maps to ``{arch}.attention.layer_norm_rms_epsilon``; the expert group
    counts read as 0 when absent (ds4 requires 0). ``swiglu_clamp_exp`` is a float or a
    per-layer list of floats, as the file holds it.
    """

    arch: str = "deepseek4"
    expert_count: int | None = None  # E
    expert_used_count: int | None = None  # k
    expert_feed_forward_length: int | None = None  # F
    embedding_length: int | None = None  # H
    block_count: int | None = None
    expert_shared_count: int | None = None
    hash_layer_count: int | None = None
    expert_weights_scale: float | None = None
    expert_weights_norm: bool | None = None
    swiglu_clamp_exp: float | list[float] | None = None
    expert_group_count: int = 0
    expert_group_used_count: int = 0
    vocab_size: int | None = None
    rms_norm_eps: float | None = None

    @staticmethod
    def _key(arch: str, field: str) -> str:
        if field == "rms_norm_eps":
            return f"{arch}.attention.layer_norm_rms_epsilon"
        return f"{arch}.{field}"

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], arch: str | None = None) -> MoEConfig:
        """Config from a metadata dict; ``arch`` defaults to ``general.architecture``."""
        if arch is None:
            arch = metadata.get("general.architecture")
            if not isinstance(arch, str) or not arch:
                raise ValueError("metadata has no general.architecture string; pass arch=")
        vals: dict[str, Any] = {"arch": arch}
        for f in fields(cls):
            if f.name == "arch":
                continue
            v = metadata.get(cls._key(arch, f.name))
            if v is None:
                continue
            if f.name == "swiglu_clamp_exp":
                v = [float(x) for x in v] if isinstance(v, list) else float(v)
            elif f.name == "expert_weights_norm":
                v = bool(v)
            elif f.name in ("expert_weights_scale", "rms_norm_eps"):
                v = float(v)
            else:
                v = int(v)
            vals[f.name] = v
        return cls(**vals)

    def to_metadata(self) -> dict[str, Any]:
        """``{arch}.*`` keys of the fields that are set (for ``write_gguf``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "arch" and v is not None:
                kind = _CONFIG_KIND.get(f.name, "uint")  # written with the type moe_config reads back
                if kind == "floats" and isinstance(v, (list, tuple)):
                    v = [float(x) for x in v]
                elif kind in ("float", "floats"):
                    v = float(v)
                out[self._key(self.arch, f.name)] = v
        return out


# --------------------------------------------------------------------------- one layer


@dataclass
class MoELayerTensors:
    """The MoE tensors of one layer; shapes are checked on construction.

    gate, up: QuantTensor (E, F, H), same qtype; down: QuantTensor (E, H, F);
    router: float [E, H]; bias: float [E] | None; tid2eid: int32 [V, k] | None
    (expert ids in 0..E-1); shared_gate, shared_up: QuantTensor (Fs, H) and
    shared_down: (H, Fs), all three or none; ffn_norm: float [H] | None.
    """

    gate: QuantTensor
    up: QuantTensor
    down: QuantTensor
    router: torch.Tensor
    bias: torch.Tensor | None = None
    tid2eid: torch.Tensor | None = None
    shared_gate: QuantTensor | None = None
    shared_up: QuantTensor | None = None
    shared_down: QuantTensor | None = None
    ffn_norm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("gate", "up", "down"):
            t = getattr(self, name)
            if not isinstance(t, QuantTensor):
                raise TypeError(f"MoE layer: {name} must be a QuantTensor, got {type(t).__name__}")
            if len(t.shape) != 3:
                raise ValueError(f"MoE layer: {name} must be an expert stack (E, N, K), got shape {t.shape}")
        if self.gate.qtype != self.up.qtype:
            raise ValueError(
                f"MoE layer: gate and up must share a quant type, got gate {self.gate.qtype} "
                f"and up {self.up.qtype}"
            )
        e, f, h = self.gate.shape
        if self.up.shape != (e, f, h):
            raise ValueError(
                f"MoE layer: up shape {self.up.shape} must equal gate shape (E, F, H) = {(e, f, h)}"
            )
        if self.down.shape != (e, h, f):
            raise ValueError(
                f"MoE layer: down shape {self.down.shape} must be (E, H, F) = {(e, h, f)} "
                f"given gate (E, F, H) = {(e, f, h)}"
            )
        _check_float("router", self.router, (e, h))
        if self.bias is not None:
            _check_float("bias", self.bias, (e,))
        if self.ffn_norm is not None:
            _check_float("ffn_norm", self.ffn_norm, (h,))
        if self.tid2eid is not None:
            t = self.tid2eid
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
                raise ValueError(
                    f"MoE layer: tid2eid must be an int32 tensor [V, k], got "
                    f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}"
                )
            # out-of-range ids would index past the expert stack later: refuse them here
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= e):
                raise ValueError(
                    f"MoE layer: tid2eid [V, k] = {tuple(t.shape)} holds expert ids in "
                    f"[{int(t.min())}, {int(t.max())}], expected 0..{e - 1}"
                )
        shared = (self.shared_gate, self.shared_up, self.shared_down)
        shared_names = ("shared_gate", "shared_up", "shared_down")
        if any(s is not None for s in shared):
            if any(s is None for s in shared):
                have = [n for n, s in zip(shared_names, shared, strict=True) if s is not None]
                raise ValueError(f"MoE layer: the shared expert needs gate, up and down; only {have} given")
            sg, su, sd = shared
            for name, s in zip(shared_names, shared, strict=True):
                if not isinstance(s, QuantTensor) or len(s.shape) != 2:
                    raise ValueError(f"MoE layer: {name} must be a 2-D QuantTensor (N, K), got {s!r}")
            fs = sg.shape[0]
            if sg.shape != (fs, h) or su.shape != (fs, h) or sd.shape != (h, fs):
                raise ValueError(
                    f"MoE layer: shared shapes gate {sg.shape}, up {su.shape}, down {sd.shape} must be "
                    f"(Fs, H), (Fs, H), (H, Fs) with H = {h}"
                )

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate.shape[2]

    @property
    def ffn_size(self) -> int:
        return self.gate.shape[1]

    def check_config(self, config: MoEConfig, where: str = "MoE layer") -> None:
        """Raise ValueError where the shapes disagree with the set fields of ``config``."""
        checks = [
            ("expert_count", config.expert_count, self.num_experts, "E"),
            ("embedding_length", config.embedding_length, self.hidden_size, "H"),
            ("expert_feed_forward_length", config.expert_feed_forward_length, self.ffn_size, "F"),
        ]
        if self.tid2eid is not None:
            checks.append(("expert_used_count", config.expert_used_count, self.tid2eid.shape[1], "tid2eid k"))
        for key, want, got, what in checks:
            if want is not None and want != got:
                raise ValueError(f"{where}: {config.arch}.{key} = {want} but the tensors have {what} = {got}")
        V = None if self.tid2eid is None else self.tid2eid.shape[0]
        if V is not None and config.vocab_size is not None and V < config.vocab_size:  # the kernels clamp a token
            raise ValueError(f"{where}: {config.arch}.vocab_size = {config.vocab_size} but the hash table "
                             f"tid2eid has V = {V} rows (tokens >= {V} would all take row {V - 1})")

    def to_tensors(self, layer: int | str) -> dict[str, QuantTensor | torch.Tensor]:
        """GGUF name -> tensor for the fields that are set."""
        names = layer_tensor_names(layer)
        return {names[f]: getattr(self, f) for f in _LAYER_NAMES if getattr(self, f) is not None}

    def to(self, device) -> MoELayerTensors:
        device = resolve(device)
        kw = {f: (None if getattr(self, f) is None else getattr(self, f).to(device)) for f in _LAYER_NAMES}
        return MoELayerTensors(**kw)


def _check_float(name: str, t: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(
            f"MoE layer: {name} must be a float tensor {list(shape)}, got {getattr(t, 'dtype', t)!r}"
        )
    if tuple(t.shape) != shape:
        raise ValueError(f"MoE layer: {name} shape {tuple(t.shape)} must be {shape}")


# --------------------------------------------------------------------------- reading


class GGUFFile:
    """A memory-mapped GGUF file.

    ``mode`` is np.memmap's: "c" (default) maps copy-on-write so the returned tensors are
    writable without touching the file; "r" maps read-only and returns copies (torch has no
    read-only tensors; a write into a read-only page would kill the process). The structure is
    checked at open (see ``_scan_header`` and ``_check_tensor_ranges``); failures raise GGUFError.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "c"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        if self.path.is_dir():
            raise IsADirectoryError(f"expected a GGUF file, got a directory: {self.path}")
        if not stat.S_ISREG(self.path.stat().st_mode):  # a FIFO or device would block or never end
            raise GGUFError(f"{self.path} is not a regular file")
        if mode not in ("c", "r"):
            raise ValueError(f"mode must be 'c' (copy-on-write map) or 'r' (read-only, tensors copied), got {mode!r}")
        self.mode = mode
        self.file_size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(4)
        if not head:
            raise ValueError(f"{self.path} is not a GGUF file: it is empty")
        if head != _MAGIC[: len(head)]:
            raise ValueError(f"{self.path} is not a GGUF file: magic {head!r}, expected {_MAGIC!r}")
        if self.file_size < _MIN_HEADER:
            raise ValueError(
                f"{self.path}: truncated or corrupt GGUF file ({self.file_size} bytes, "
                f"shorter than the {_MIN_HEADER}-byte header)"
            )
        self._header_end = _scan_header(self.path, self.file_size)
        try:
            reader = GGUFReader(self.path, mode=mode)
        except Exception as exc:  # the reader fails in many ways on short or garbled headers
            raise GGUFError(
                f"{self.path}: truncated or corrupt GGUF file ({self.file_size} bytes): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if reader.byte_order != "I":
            raise ValueError(f"{self.path}: big-endian GGUF files are not supported")
        self._reader: GGUFReader | None = reader
        self._tensors = {t.name: t for t in reader.tensors}
        self._check_tensor_ranges()
        self._metadata: dict[str, Any] | None = None

    def _check_tensor_ranges(self) -> None:
        """Before any tensor is handed out: the padding before the data section is zeros (a changed
        tensor count or ``general.alignment`` moves the data start and shows here), and the tensors
        lie packed in info order, each at the next multiple of the alignment after the previous one,
        inside the file. That is the layout every GGUF writer produces and llama.cpp's loader
        requires; it rules out overlaps, gaps and misaligned or out-of-file offsets at once."""
        r = self._r
        align, data_start = int(r.alignment), int(r.data_offset)
        if len(self._tensors) != len(r.tensors):
            dup = next(t.name for t in r.tensors if sum(u.name == t.name for u in r.tensors) > 1)
            raise GGUFError(f"{self.path}: corrupt GGUF file: tensor name {dup!r} appears twice")
        pad = bytes(r.data[self._header_end : data_start])
        if data_start - self._header_end >= align or pad.strip(b"\0"):
            raise GGUFError(
                f"{self.path}: corrupt GGUF file: the data section should start at the next multiple of "
                f"{align} after the header (byte {self._header_end}) after zero padding, but starts at byte "
                f"{data_start}; the tensor count or general.alignment does not match the header"
            )
        expected = data_start
        for t in r.tensors:
            dims = [int(d) for d in t.shape]
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            if not dims or any(d <= 0 for d in dims) or dims[0] % block:
                raise GGUFError(
                    f"{self.path}: corrupt GGUF tensor {t.name!r}: dims {dims} invalid for "
                    f"{t.tensor_type.name}"
                )
            nbytes = math.prod(dims) // block * type_size
            start = int(t.data_offset)
            if start != expected:
                raise GGUFError(
                    f"{self.path}: corrupt GGUF file: tensor {t.name!r} starts at byte {start}, expected byte "
                    f"{expected} (the end of the previous tensor rounded up to the alignment {align}); its "
                    f"offset, or the type or dims of a tensor before it, is wrong"
                )
            if start + nbytes > self.file_size or t.data.nbytes != nbytes:
                raise GGUFError(
                    f"{self.path}: truncated or corrupt GGUF file: tensor {t.name!r} needs bytes "
                    f"[{start}, {start + nbytes}) but the file has {self.file_size} bytes"
                )
            expected = start + -(-nbytes // align) * align
            # writers pad with zeros; bytes left there mean a tensor shrank (a type or dim changed)
            tail = bytes(r.data[start + nbytes : min(expected, self.file_size)])
            if tail.strip(b"\0"):
                raise GGUFError(
                    f"{self.path}: corrupt GGUF file: the padding after tensor {t.name!r} (bytes "
                    f"[{start + nbytes}, {min(expected, self.file_size)})) is not zeros; its type or dims "
                    f"({t.tensor_type.name} {dims}) describe fewer bytes than were written"
                )
        # the file ends with the last tensor's data or its padding: more bytes mean that tensor, or the
        # tensor count, describes less than was written
        if self.file_size > expected:
            last = f"the last tensor, {r.tensors[-1].name!r}" if len(r.tensors) else "the header (no tensors)"
            raise GGUFError(
                f"{self.path}: corrupt GGUF file: {self.file_size - expected} bytes after the end of {last} "
                f"(byte {expected}); a tensor's type or dims, or the tensor count, is wrong"
            )

    @property
    def _r(self) -> GGUFReader:
        if self._reader is None:
            raise ValueError(f"{self.path}: this GGUFFile is closed")
        return self._reader

    # -- context manager: the map lives as long as any returned tensor anyway
    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop this object's references to the map (tensors already returned stay valid)."""
        self._tensors = {}
        self._reader = None
        self._metadata = None

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, tensors={len(self._tensors)})"

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    # -- metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """Key -> python value (str, int, float, bool, or list of those for arrays)."""
        fields_ = self._r.fields
        if self._metadata is None:
            md = {}
            for key, field in fields_.items():
                if key.startswith("GGUF."):  # the reader's pseudo-fields for the header
                    continue
                md[key] = field.contents()
            self._metadata = md
        return self._metadata

    def get_metadata(self, key: str, default: Any = None) -> Any:
        """One metadata value (without converting the whole, possibly huge, tokenizer metadata)."""
        field = self._r.fields.get(key)
        return default if field is None or key.startswith("GGUF.") else field.contents()

    @property
    def arch(self) -> str | None:
        """general.architecture, or None when the file has none (then no config is checked)."""
        a = self.get_metadata("general.architecture")
        if a is not None and not isinstance(a, str):
            raise GGUFError(f"{self.path}: metadata 'general.architecture' is {a!r}, not a string")
        return a

    def moe_config(self) -> MoEConfig:
        """MoE hyper-parameters from the ``{general.architecture}.*`` keys."""
        arch = self.arch
        if not isinstance(arch, str):
            raise ValueError(f"{self.path}: no general.architecture string in the metadata")
        keys = [MoEConfig._key(arch, f.name) for f in fields(MoEConfig) if f.name != "arch"]
        for f, key in zip([f for f in fields(MoEConfig) if f.name != "arch"], keys, strict=True):
            field = self._r.fields.get(key)
            if field is None:
                continue
            kind = _CONFIG_KIND.get(f.name, "uint")
            types = [GGUFValueType(t) for t in field.types]
            ok = {
                "uint": types[0] in _INT_TYPES,
                "float": types[0] in _FLOAT_TYPES,
                "bool": types[0] == GGUFValueType.BOOL,
                "floats": types[0] in _FLOAT_TYPES
                or (types[0] == GGUFValueType.ARRAY and len(types) == 2 and types[1] in _FLOAT_TYPES),
            }[kind]
            if not ok:  # reading a value as another type gives nonsense (the bits of 1.5f are 1069547520)
                raise GGUFError(
                    f"{self.path}: metadata {key!r} is stored as {'/'.join(t.name for t in types)}; moetile "
                    f"reads it as {_KIND_TEXT[kind]}"
                )
            if kind == "uint" and field.contents() < 0:
                raise GGUFError(f"{self.path}: metadata {key!r} = {field.contents()} is negative")
        return MoEConfig.from_metadata({k: self.get_metadata(k) for k in keys}, arch)

    # -- tensor directory
    def tensor_names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._tensors)

    def layers(self) -> list[int]:
        """Sorted layer indices L that have ``blk.L.ffn_gate_exps.weight``, under a plain decimal L. In
        a file with such layers, every layer holding one of the gate/up/down expert stacks must hold
        all three (a damaged name would otherwise drop its layer without a word); a file with none
        (merged ``ffn_gate_up_exps``, ungated experts) has no layers moetile reads: []."""
        found: dict[int, set[str]] = {}
        for n in self._tensors:
            m = _EXPS_RE.fullmatch(n)
            if m is None:
                continue
            if not _INDEX_RE.fullmatch(m.group(1)):
                raise GGUFError(f"{self.path}: tensor {n!r}: layer index {m.group(1)!r} is not a plain decimal number")
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
        if not any("gate" in parts for parts in found.values()):
            return []
        for layer, parts in sorted(found.items()):
            if len(parts) < 3:
                held = sorted(f"blk.{layer}.ffn_{p}_exps" for p in parts)
                missing = [f"blk.{layer}.ffn_{p}_exps.weight" for p in ("gate", "up", "down") if p not in parts]
                raise GGUFError(f"{self.path}: layer {layer} holds {held} but no {missing}")
        return sorted(found)

    def tensor_type(self, name: str) -> str:
        """GGML type name of ``name``, e.g. "Q4_K", "F16"."""
        return self._get(name).tensor_type.name

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Logical row-major shape (GGUF dims reversed)."""
        return tuple(int(d) for d in reversed(self._get(name).shape.tolist()))

    def _get(self, name: str):
        t = self._tensors.get(name) if self._r is not None else None
        if t is None:
            if not isinstance(name, str):
                raise TypeError(f"tensor name must be a str, got {type(name).__name__}")
            stem = name.rsplit(".", 2)[0] + "." if name.count(".") >= 2 else ""
            near = [n for n in self._tensors if stem and n.startswith(stem)] or list(self._tensors)
            shown = ", ".join(near[:12]) + (", ..." if len(near) > 12 else "")
            raise TensorNotFoundError(
                f"{self.path}: no tensor named {name!r}; the file has {len(self._tensors)} tensors"
                + (f", e.g. {shown}" if shown else "")
            )
        return t

    # -- tensors
    def quant_tensor(self, name: str, device=None) -> QuantTensor:
        """The quantized tensor ``name`` as a QuantTensor over the mapped bytes (no copy on CPU).

        Returns uint8 data [*shape[:-1], row_bytes] with logical shape (E, N, K) or (N, K).
        """
        t = self._get(name)
        ttype = t.tensor_type
        if ttype in _PLAIN_TO_TORCH:
            raise ValueError(f"tensor {name!r} is {ttype.name}, not quantized; use float_tensor()")
        if ttype.name not in FORMATS:
            raise ValueError(
                f"tensor {name!r} has quant type {ttype.name} (GGML type {int(ttype)}), which moetile does "
                f"not support; supported: {', '.join(QTYPES)}"
            )
        shape = self.tensor_shape(name)
        if len(shape) not in (2, 3):
            raise ValueError(
                f"tensor {name!r} ({ttype.name}) has shape {shape}; expected (N, K) or (E, N, K)"
            )
        data = torch.from_numpy(self._host(t.data))  # uint8 [*shape[:-1], row_bytes]
        qt = QuantTensor(data, ttype.name, shape)
        return qt if device is None else qt.to(device)

    def float_tensor(self, name: str, device=None) -> torch.Tensor:
        """The unquantized tensor ``name`` (F32/F16/BF16/F64/I8/I16/I32/I64) in its own dtype,
        with the row-major shape (GGUF dims reversed), over the mapped bytes (no copy on CPU)."""
        t = self._get(name)
        ttype = t.tensor_type
        if ttype not in _PLAIN_TO_TORCH:
            raise ValueError(
                f"tensor {name!r} is {ttype.name} (quantized or unsupported); use quant_tensor()"
            )
        shape = self.tensor_shape(name)
        if ttype == GGMLQuantizationType.BF16:  # the reader hands BF16 out as raw bytes
            out = torch.from_numpy(self._host(t.data).reshape(-1)).view(torch.bfloat16).reshape(shape)
        else:
            out = torch.from_numpy(self._host(t.data)).reshape(shape)
        return out if device is None else out.to(resolve(device))

    def _host(self, a: np.ndarray) -> np.ndarray:
        """The mapped bytes (copy-on-write map), or a copy of them (read-only map: torch has no
        read-only tensors, and a write into a read-only page would kill the process)."""
        return np.array(a) if self.mode == "r" else a

    def tensor(self, name: str, device=None) -> QuantTensor | torch.Tensor:
        """``float_tensor`` for unquantized types, ``quant_tensor`` otherwise."""
        if self._get(name).tensor_type in _PLAIN_TO_TORCH:
            return self.float_tensor(name, device)
        return self.quant_tensor(name, device)

    def _check_layer_names(self, names: dict[str, str], where: str) -> None:
        """A layer tensor that is absent while the file holds a name one byte away from it was
        renamed by corruption: refuse it rather than run the layer without, say, its bias."""
        required = [_LAYER_NAMES[f] for f in ("gate", "up", "down", "router")]
        for field, name in names.items():
            if name in self._tensors:
                continue
            suffix = _LAYER_NAMES[field]
            for other in self._tensors:
                if len(other) != len(name) or sum(a != b for a, b in zip(other, name, strict=True)) != 1:
                    continue
                # the same tensor of another whole layer (blk.1 next to blk.0) is not damage
                p = other[: -len(suffix)]
                if other.endswith("." + suffix) and all(p + r in self._tensors for r in required):
                    continue
                raise GGUFError(
                    f"{where}: corrupt GGUF file: no tensor {name!r} ({field}) but a tensor {other!r}, "
                    f"one character away; its name was damaged"
                )

    def _check_required(self, layer: int | str, kw: dict[str, Any], names: dict[str, str], where: str) -> None:
        """Optional tensors the metadata says this layer has must be there."""
        cfg = self.moe_config()
        need = []
        if cfg.expert_shared_count:
            need += [(f, f"{cfg.arch}.expert_shared_count = {cfg.expert_shared_count}") for f in _SHARED]
        if isinstance(layer, (int, np.integer)) and cfg.hash_layer_count and layer < cfg.hash_layer_count:
            need.append(("tid2eid", f"{cfg.arch}.hash_layer_count = {cfg.hash_layer_count}"))
        for f, why in need:
            if kw[f] is None:
                raise GGUFError(f"{where}: {why} but the file has no tensor {names[f]!r} ({f})")

    def moe_layer(self, layer: int | str, device=None, check_config: bool = True) -> MoELayerTensors:
        """The MoE tensors of ``layer`` (int L for ``blk.L``, or a prefix like ``"mtp.0"``).

        Shapes are checked against each other and, with ``check_config``, against the
        ``{arch}.*`` metadata keys that are present.
        """
        device = resolve(device)
        names = layer_tensor_names(layer)
        where = f"{self.path} layer {_prefix(layer)}"
        self._check_layer_names(names, where)
        if names["gate"] not in self._tensors:
            raise TensorNotFoundError(
                f"{self.path}: no MoE layer {_prefix(layer)} (no tensor {names['gate']!r}); the file's MoE "
                f"layers: {self.layers() or 'none'}"
            )
        kw: dict[str, Any] = {}
        for f in ("gate", "up", "down"):
            kw[f] = self.quant_tensor(names[f], device)
        kw["router"] = self.float_tensor(names["router"], device)
        for f in ("bias", "tid2eid", "ffn_norm"):
            kw[f] = self.float_tensor(names[f], device) if names[f] in self._tensors else None
        for f in _SHARED:
            kw[f] = self.quant_tensor(names[f], device) if names[f] in self._tensors else None
        try:
            lt = MoELayerTensors(**kw)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if check_config and isinstance(self.arch, str):
            lt.check_config(self.moe_config(), where)
            self._check_required(layer, kw, names, where)
        return lt


def open_gguf(path: str | os.PathLike[str], mode: str = "c") -> GGUFFile:
    """Open a GGUF file memory-mapped (see GGUFFile)."""
    return GGUFFile(path, mode)


# --------------------------------------------------------------------------- writing


def _int_type(values: Sequence[int], key: str) -> GGUFValueType:
    """uint32 where it fits, else uint64 for non-negative values, else int32/int64."""
    lo, hi = min(values), max(values)
    if lo >= 0:
        if hi < 2**32:
            return GGUFValueType.UINT32
        if hi < 2**64:
            return GGUFValueType.UINT64
    elif lo >= -(2**31) and hi < 2**31:
        return GGUFValueType.INT32
    elif lo >= -(2**63) and hi < 2**63:
        return GGUFValueType.INT64
    raise ValueError(f"metadata {key!r}: integer out of 64-bit range ({lo}..{hi})")


def _scalar_kind(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    if isinstance(v, str):
        return "str"
    return type(v).__name__


def _f32(key: str, v: float) -> float:
    if math.isfinite(v) and abs(v) > 3.4028234663852886e38:
        raise ValueError(f"metadata {key!r}: {v!r} is beyond float32, GGUF's float type")
    return v


def _utf8(key: str, v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"metadata {key!r}: string is not valid UTF-8 ({exc.reason})") from None
    return v


def _metadata_value(key: str, v: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, GGUF type, array sub-type): ints uint32 (wider/signed if needed), floats float32."""
    if isinstance(v, (np.ndarray, torch.Tensor)):
        ndim = v.dim() if isinstance(v, torch.Tensor) else v.ndim
        if ndim != 1:
            raise ValueError(f"metadata {key!r}: arrays must be 1-D, got shape {tuple(v.shape)}")
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f"metadata {key!r}: GGUF cannot store an empty array")
        kinds = {_scalar_kind(x) for x in v}
        if kinds == {"bool"}:
            return [bool(x) for x in v], GGUFValueType.ARRAY, GGUFValueType.BOOL
        if kinds == {"int"}:
            vals = [int(x) for x in v]
            return vals, GGUFValueType.ARRAY, _int_type(vals, key)
        if kinds <= {"int", "float"}:
            return [_f32(key, float(x)) for x in v], GGUFValueType.ARRAY, GGUFValueType.FLOAT32
        if kinds == {"str"}:
            return [_utf8(key, x) for x in v], GGUFValueType.ARRAY, GGUFValueType.STRING
        raise TypeError(
            f"metadata {key!r}: array items must all be bool, int, float or str, got {sorted(kinds)}"
        )
    kind = _scalar_kind(v)
    if kind == "bool":
        return bool(v), GGUFValueType.BOOL, None
    if kind == "int":
        return int(v), _int_type([int(v)], key), None
    if kind == "float":
        return _f32(key, float(v)), GGUFValueType.FLOAT32, None
    if kind == "str":
        return _utf8(key, v), GGUFValueType.STRING, None
    raise TypeError(f"metadata {key!r}: unsupported value type {kind} (use bool, int, float, str or a list)")


def _tensor_array(name: str, t: QuantTensor | torch.Tensor) -> tuple[np.ndarray, GGMLQuantizationType]:
    """Host numpy array and GGML type to hand to GGUFWriter.add_tensor."""
    if isinstance(t, QuantTensor):
        arr = t.data.detach().to("cpu").contiguous().numpy()  # uint8 [*shape[:-1], row_bytes]
        return arr, t.format.ggml_type
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor {name!r}: expected a QuantTensor or torch.Tensor, got {type(t).__name__}")
    ttype = _TORCH_TO_PLAIN.get(t.dtype)
    if ttype is None:
        raise TypeError(
            f"tensor {name!r}: dtype {t.dtype} cannot be stored; use one of "
            f"{', '.join(str(d) for d in _TORCH_TO_PLAIN)} or a QuantTensor"
        )
    if not 1 <= t.dim() <= 4 or t.numel() == 0:
        raise ValueError(
            f"tensor {name!r}: GGUF needs a non-empty tensor of 1 to 4 dims, got shape {tuple(t.shape)}"
        )
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; the bits are what GGUF stores
    return t.numpy(), ttype


_MAX_ALIGN = 1 << 16  # ggml's readers take any power of two; a larger one only pads the file


def write_gguf(
    path: str | os.PathLike[str],
    tensors: Mapping[str, QuantTensor | torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    arch: str = "deepseek4",
) -> None:
    """Write ``tensors`` (name -> QuantTensor or torch.Tensor) and ``metadata`` to a GGUF file.

    QuantTensors are written as their raw blocks with their GGML type (read back byte for
    byte); torch tensors as F32/F16/BF16/F64/I8/I16/I32/I64 by dtype. Metadata values:
    bool, int (uint32; int32/int64/uint64 when out of range), float (float32), str, or a
    non-empty 1-D list of one of those. ``general.architecture`` is ``arch``; a
    ``general.alignment`` (power of two in [8, 65536], default 32) sets the tensor padding. The file is
    written to a temporary name and renamed, so a failed write leaves no partial file.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    if "general.architecture" in metadata and metadata.pop("general.architecture") != arch:
        raise ValueError(f"metadata general.architecture disagrees with arch={arch!r}")
    align = metadata.pop("general.alignment", None)  # it moves every tensor: the writer must pad by it
    if align is not None and (type(align) is not int or not 8 <= align <= _MAX_ALIGN or align & (align - 1)):
        raise ValueError(f"metadata general.alignment must be a power of two in [8, {_MAX_ALIGN}], got {align!r}")
    kv = []
    for key, v in metadata.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metadata keys must be non-empty str, got {key!r}")
        if key.startswith("GGUF."):  # the reader's own view of the header: a file holding one cannot be opened
            raise ValueError(f"metadata key {key!r}: the GGUF. prefix is reserved for the file header")
        kv.append((key, *_metadata_value(key, v)))
    arrays = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or len(name.encode()) > _MAX_NAME_BYTES:
            raise ValueError(
                f"tensor name {name!r} must be a non-empty str of at most {_MAX_NAME_BYTES} bytes"
            )
        arrays.append((name, *_tensor_array(name, t)))

    # a fresh name next to the target (opened by the writer with normal permissions), renamed at the end
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        w = GGUFWriter(tmp, arch)
        if align is not None:
            w.add_custom_alignment(align)
        for key, val, vtype, sub in kv:
            w.add_key_value(key, val, vtype, sub_type=sub)
        for name, arr, ttype in arrays:
            w.add_tensor(name, arr, raw_dtype=ttype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_moe_layers(
    path: str | os.PathLike[str],
    layers: Mapping[int | str, MoELayerTensors],
    config: MoEConfig | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> MoEConfig:
    """Write MoE layers (key L -> ``blk.L.*``, or a prefix like ``"mtp.0"``) with ds4 names and
    the ``{arch}.*`` MoE metadata of ``config``; returns the config written.

    Without ``config`` one is derived from the tensors (E, H, F, k from tid2eid, block_count
    = max int L + 1). A given config must agree with every layer's shapes. ``metadata`` adds
    or overrides keys.
    """
    if not layers:
        raise ValueError("write_moe_layers: layers is empty")
    first = next(iter(layers.values()))
    if config is None:
        int_keys = [int(k) for k in layers if not isinstance(k, str)]
        k_used = next((lt.tid2eid.shape[1] for lt in layers.values() if lt.tid2eid is not None), None)
        config = MoEConfig(
            expert_count=first.num_experts,
            embedding_length=first.hidden_size,
            expert_feed_forward_length=first.ffn_size,
            expert_used_count=k_used,
            block_count=max(int_keys) + 1 if int_keys else None,
        )
    tensors: dict[str, QuantTensor | torch.Tensor] = {}
    for layer, lt in layers.items():
        if not isinstance(lt, MoELayerTensors):
            raise TypeError(f"layer {layer!r}: expected MoELayerTensors, got {type(lt).__name__}")
        if not isinstance(layer, (str, bool)) and isinstance(layer, (int, np.integer)) and int(layer) < 0:
            raise ValueError(f"layer {layer!r}: a layer index must be >= 0")
        lt.check_config(config, f"layer {_prefix(layer)}")
        new = lt.to_tensors(layer)
        clash = sorted(set(new) & set(tensors))
        if clash:  # 0 and "blk.0" name the same tensors: one layer would silently replace the other
            raise ValueError(f"layer {layer!r} writes tensors another key already wrote: {clash[:3]}")
        tensors.update(new)
    md = config.to_metadata()
    md.update(metadata or {})
    write_gguf(path, tensors, md, arch=config.arch)
    return config


write_moe_layer = write_moe_layers  # the name the project brief uses
