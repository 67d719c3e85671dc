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
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .quant import FORMATS, QTYPES, QuantTensor

__all__ = [
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
_LAYER_RE = re.compile(r"^blk\.(\d+)\.ffn_gate_exps\.weight$")


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

    def to_tensors(self, layer: int | str) -> dict[str, QuantTensor | torch.Tensor]:
        """GGUF name -> tensor for the fields that are set."""
        names = layer_tensor_names(layer)
        return {names[f]: getattr(self, f) for f in _LAYER_NAMES if getattr(self, f) is not None}

    def to(self, device) -> MoELayerTensors:
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
    writable without touching the file; "r" maps read-only (writing into a tensor then
    crashes the process).
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "c"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        if self.path.is_dir():
            raise IsADirectoryError(f"expected a GGUF file, got a directory: {self.path}")
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
        try:
            reader = GGUFReader(self.path, mode=mode)
        except Exception as exc:  # the reader fails in many ways on short or garbled headers
            raise ValueError(
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
        # The reader can accept short data (or overflowing dims); check every byte range here.
        for t in self._tensors.values():
            dims = [int(d) for d in t.shape]
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            if not dims or any(d <= 0 for d in dims) or dims[0] % block:
                raise ValueError(
                    f"{self.path}: corrupt GGUF tensor {t.name!r}: dims {dims} invalid for "
                    f"{t.tensor_type.name}"
                )
            nbytes = math.prod(dims) // block * type_size
            end = int(t.data_offset) + nbytes
            if end > self.file_size or t.data.nbytes != nbytes:
                raise ValueError(
                    f"{self.path}: truncated or corrupt GGUF file: tensor {t.name!r} needs bytes "
                    f"[{t.data_offset}, {end}) but the file has {self.file_size} bytes"
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
        return self.get_metadata("general.architecture")

    def moe_config(self) -> MoEConfig:
        """MoE hyper-parameters from the ``{general.architecture}.*`` keys."""
        arch = self.arch
        if not isinstance(arch, str):
            raise ValueError(f"{self.path}: no general.architecture string in the metadata")
        keys = [MoEConfig._key(arch, f.name) for f in fields(MoEConfig) if f.name != "arch"]
        return MoEConfig.from_metadata({k: self.get_metadata(k) for k in keys}, arch)

    # -- tensor directory
    def tensor_names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._tensors)

    def layers(self) -> list[int]:
        """Sorted layer indices L that have ``blk.L.ffn_gate_exps.weight``."""
        return sorted(int(m.group(1)) for n in self._tensors if (m := _LAYER_RE.match(n)))

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
        data = torch.from_numpy(t.data)  # uint8 [*shape[:-1], row_bytes]
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
            out = torch.from_numpy(t.data.reshape(-1)).view(torch.bfloat16).reshape(shape)
        else:
            out = torch.from_numpy(t.data).reshape(shape)
        return out if device is None else out.to(device)

    def tensor(self, name: str, device=None) -> QuantTensor | torch.Tensor:
        """``float_tensor`` for unquantized types, ``quant_tensor`` otherwise."""
        if self._get(name).tensor_type in _PLAIN_TO_TORCH:
            return self.float_tensor(name, device)
        return self.quant_tensor(name, device)

    def moe_layer(self, layer: int | str, device=None, check_config: bool = True) -> MoELayerTensors:
        """The MoE tensors of ``layer`` (int L for ``blk.L``, or a prefix like ``"mtp.0"``).

        Shapes are checked against each other and, with ``check_config``, against the
        ``{arch}.*`` metadata keys that are present.
        """
        names = layer_tensor_names(layer)
        kw: dict[str, Any] = {}
        for f in ("gate", "up", "down"):
            kw[f] = self.quant_tensor(names[f], device)
        kw["router"] = self.float_tensor(names["router"], device)
        for f in ("bias", "tid2eid", "ffn_norm"):
            kw[f] = self.float_tensor(names[f], device) if names[f] in self._tensors else None
        for f in ("shared_gate", "shared_up", "shared_down"):
            kw[f] = self.quant_tensor(names[f], device) if names[f] in self._tensors else None
        where = f"{self.path} layer {_prefix(layer)}"
        try:
            lt = MoELayerTensors(**kw)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if check_config and isinstance(self.arch, str):
            lt.check_config(self.moe_config(), where)
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
            return [float(x) for x in v], GGUFValueType.ARRAY, GGUFValueType.FLOAT32
        if kinds == {"str"}:
            return list(v), GGUFValueType.ARRAY, GGUFValueType.STRING
        raise TypeError(
            f"metadata {key!r}: array items must all be bool, int, float or str, got {sorted(kinds)}"
        )
    kind = _scalar_kind(v)
    if kind == "bool":
        return bool(v), GGUFValueType.BOOL, None
    if kind == "int":
        return int(v), _int_type([int(v)], key), None
    if kind == "float":
        return float(v), GGUFValueType.FLOAT32, None
    if kind == "str":
        return v, GGUFValueType.STRING, None
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
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(
            f"tensor {name!r}: GGUF needs a non-empty tensor with >= 1 dim, got shape {tuple(t.shape)}"
        )
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; the bits are what GGUF stores
    return t.numpy(), ttype


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
    non-empty 1-D list of one of those. ``general.architecture`` is ``arch``. The file is
    written to a temporary name and renamed, so a failed write leaves no partial file.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    if "general.architecture" in metadata and metadata.pop("general.architecture") != arch:
        raise ValueError(f"metadata general.architecture disagrees with arch={arch!r}")
    kv = []
    for key, v in metadata.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metadata keys must be non-empty str, got {key!r}")
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
        lt.check_config(config, f"layer {_prefix(layer)}")
        tensors.update(lt.to_tensors(layer))
    md = config.to_metadata()
    md.update(metadata or {})
    write_gguf(path, tensors, md, arch=config.arch)
    return config


write_moe_layer = write_moe_layers  # the name the project brief uses
