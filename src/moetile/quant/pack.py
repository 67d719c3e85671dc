"""Kernel-native packed forms of GGUF tensors, made once at load: ``pack(qt, form) -> PackedTensor``.

GGUF blocks (``QuantTensor``) stay the interchange format; every kernel reads a ``PackedTensor``.
A form splits the blocks into planes (row-major, K contiguous; leading dims (E,) or ()) so a
kernel loads each with 16-byte vectors and decodes several weights per instruction. Every form
is lossless: ``pack(qt).dequantize()`` equals ``qt.dequantize()`` bit for bit.

Letters: N output rows, K inputs per row (a multiple of 256).

Forms, planes per row, bits per weight (GGUF's in brackets):

* Q4_K planar, 4.625 (4.5): codes u8 [K/2], byte j = q(2j) | q(2j+1) << 4; scales u8 [K/32, 2]
  = (sc, m); dd f16 [K/256, 2] = (d, dmin).
* Q2_K planar, 2.625 (2.625): codes u8 [K/4], byte j = sum of q(4j+i) << 2i; scales u8 [K/16]
  = sc | m << 4 (GGUF's bytes); dd f16 [K/256, 2].
* IQ2_XXS fast, 4.1875 (2.0625): codes u8 [K/2], nibbles as Q4_K, each c | neg << 2 with
  c = 0, 1, 2 for grid values 8, 25, 43 (the parity sign expanded); scales u8 [K/64] =
  s(2i) | s(2i+1) << 4; d f16 [K/256].
* IQ2_XXS compact, 2.0625 (2.0625): grid u8 [K/8], the grid index of each 8 weights; signs i32
  [K/32], GGUF's word (four 7-bit sign indices, s at bits 28..31); d f16 [K/256].
* Q8_0 planar, 8.5 (8.5): codes i8 [K]; d f16 [K/32].

Q4_K, Q2_K and Q8_0 have one form (``planar``), which is both their fast and their compact one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import refuse_meta, resolve
from . import iq2_xxs as _iq2
from .formats import canonical
from .q4_k import _unpack_scales as _q4k_unpack_scales
from .tensor import QuantTensor

FORMS = ("auto", "fast", "compact")
# IQ2_XXS default form: see BENCHMARKS.md (speed of each form on the H100) and the README (memory).
IQ2_DEFAULT = "fast"

_PLANES = {
    ("Q4_K", "planar"): ("codes", "scales", "dd"),
    ("Q2_K", "planar"): ("codes", "scales", "dd"),
    ("IQ2_XXS", "fast"): ("codes", "scales", "d"),
    ("IQ2_XXS", "compact"): ("grid", "signs", "d"),
    ("Q8_0", "planar"): ("codes", "d"),
}


def _plane_shapes(qtype: str, form: str, K: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-row shape and dtype of each plane of (qtype, form) for K inputs."""
    s = K // 256
    return {
        ("Q4_K", "planar"): {"codes": ((K // 2,), torch.uint8), "scales": ((K // 32, 2), torch.uint8),
                             "dd": ((s, 2), torch.float16)},
        ("Q2_K", "planar"): {"codes": ((K // 4,), torch.uint8), "scales": ((K // 16,), torch.uint8),
                             "dd": ((s, 2), torch.float16)},
        ("IQ2_XXS", "fast"): {"codes": ((K // 2,), torch.uint8), "scales": ((K // 64,), torch.uint8),
                              "d": ((s,), torch.float16)},
        ("IQ2_XXS", "compact"): {"grid": ((K // 8,), torch.uint8), "signs": ((K // 32,), torch.int32),
                                 "d": ((s,), torch.float16)},
        ("Q8_0", "planar"): {"codes": ((K,), torch.int8), "d": ((K // 32,), torch.float16)},
    }[(qtype, form)]


@dataclass(frozen=True)
class PackedTensor:
    """A GGUF-quantized tensor in a kernel-native form. ``shape`` is the logical (E, N, K) or
    (N, K); ``planes`` maps each plane name of the form (module docstring) to a contiguous tensor
    of shape (*shape[:-1], *per-row shape)."""

    qtype: str
    form: str  # "planar" (Q4_K, Q2_K, Q8_0), "fast" or "compact" (IQ2_XXS)
    shape: tuple[int, ...]
    planes: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        object.__setattr__(self, "qtype", canonical(self.qtype))
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if (self.qtype, self.form) not in _PLANES:
            raise ValueError(f"no packed form {self.form!r} for {self.qtype}")
        if len(shape) not in (2, 3) or any(s <= 0 for s in shape):
            raise ValueError(f"PackedTensor shape must be positive (N, K) or (E, N, K), got {shape}")
        if shape[-1] % 256:
            raise ValueError(f"{self.qtype} packed forms need K to be a multiple of 256, got K={shape[-1]}")
        want = _plane_shapes(self.qtype, self.form, shape[-1])
        if set(self.planes) != set(want):
            raise ValueError(f"{self.qtype}/{self.form} needs planes {sorted(want)}, got {sorted(self.planes)}")
        devices = set()
        for name, (row_shape, dtype) in want.items():
            p = self.planes[name]
            full = (*shape[:-1], *row_shape)
            if not isinstance(p, torch.Tensor) or p.dtype != dtype or tuple(p.shape) != full:
                raise ValueError(
                    f"{self.qtype}/{self.form} plane {name!r} must be {dtype} {full}, got "
                    f"{getattr(p, 'dtype', type(p))} {tuple(getattr(p, 'shape', ()))}"
                )
            if not p.is_contiguous():
                raise ValueError(f"plane {name!r} must be contiguous")
            refuse_meta(f"plane {name!r}", p)
            devices.add(p.device)
        if len(devices) != 1:
            raise ValueError(f"planes are on different devices: {devices}")

    @property
    def device(self) -> torch.device:
        return next(iter(self.planes.values())).device

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.planes.values())

    @property
    def num_experts(self) -> int:
        if len(self.shape) != 3:
            raise ValueError(f"not an expert stack: shape {self.shape}")
        return self.shape[0]

    @property
    def plane_order(self) -> tuple[str, ...]:
        """Plane names in the order the kernels take them."""
        return _PLANES[(self.qtype, self.form)]

    def to(self, device) -> PackedTensor:
        device = resolve(device)
        return PackedTensor(self.qtype, self.form, self.shape, {k: v.to(device) for k, v in self.planes.items()})

    def expert(self, e: int) -> PackedTensor:
        """The (N, K) matrix of expert ``e`` (views, no copy)."""
        n_exp = self.num_experts
        if not -n_exp <= e < n_exp:
            raise IndexError(f"expert {e} out of range for {n_exp} experts")
        return PackedTensor(self.qtype, self.form, self.shape[1:], {k: v[e] for k, v in self.planes.items()})

    def experts(self, start: int, stop: int) -> PackedTensor:
        """The (stop - start, N, K) stack of experts start..stop-1 (views, no copy)."""
        if not 0 <= start < stop <= self.num_experts:
            raise IndexError(f"experts [{start}, {stop}) out of range for {self.num_experts} experts")
        return PackedTensor(self.qtype, self.form, (stop - start, *self.shape[1:]),
                            {k: v[start:stop] for k, v in self.planes.items()})

    def stack(self) -> PackedTensor:
        """A plain (N, K) matrix as a one-expert stack (1, N, K), no copy; stacks as they are."""
        if len(self.shape) == 3:
            return self
        planes = {k: v.unsqueeze(0) for k, v in self.planes.items()}
        return PackedTensor(self.qtype, self.form, (1, *self.shape), planes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float tensor of ``shape``: float32 math in GGUF's order (bit-identical to the
        QuantTensor it was packed from), then cast to ``dtype``."""
        return _DEQUANT[(self.qtype, self.form)](self.planes, self.shape).to(dtype)

    def __repr__(self) -> str:
        return (f"PackedTensor({self.qtype}/{self.form}, shape={self.shape}, device={self.device}, "
                f"nbytes={self.nbytes})")


def resolve_form(qtype, form: str = "auto") -> str:
    """The form name ``pack`` builds for ``qtype`` when asked for ``form`` ("auto", "fast" or
    "compact")."""
    qtype = canonical(qtype)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if qtype != "IQ2_XXS":
        return "planar"
    return IQ2_DEFAULT if form == "auto" else form


def pack(qt: QuantTensor | PackedTensor, form: str = "auto") -> PackedTensor:
    """The packed form of ``qt`` (on qt's device). ``form``: "auto", "fast" or "compact" (they
    differ for IQ2_XXS only). A PackedTensor of the requested form is returned as it is."""
    if isinstance(qt, PackedTensor):
        if form == "auto" or resolve_form(qt.qtype, form) == qt.form:
            return qt
        raise ValueError(f"already packed as {qt.qtype}/{qt.form}; pack the QuantTensor for form {form!r}")
    if not isinstance(qt, QuantTensor):
        raise TypeError(f"pack: expected a QuantTensor, got {type(qt).__name__}")
    name = resolve_form(qt.qtype, form)
    K = qt.shape[-1]
    if K % 256:
        raise ValueError(f"{qt.qtype} packed forms need K to be a multiple of 256, got K={K}")
    lead = qt.shape[:-1]
    planes = _PACK[(qt.qtype, name)](qt.data.reshape(-1, qt.row_bytes), K)
    shapes = _plane_shapes(qt.qtype, name, K)
    planes = {k: v.reshape(*lead, *shapes[k][0]).contiguous() for k, v in planes.items()}
    return PackedTensor(qt.qtype, name, qt.shape, planes)


def packed(w: QuantTensor | PackedTensor, form: str = "auto") -> PackedTensor:
    """``pack(w, form)``, cached on the QuantTensor (a QuantTensor is immutable by contract), so
    functional calls on the same QuantTensor pack it once, not per call."""
    if isinstance(w, PackedTensor):
        return pack(w, form)
    if not isinstance(w, QuantTensor):
        raise TypeError(f"expected a QuantTensor or PackedTensor, got {type(w).__name__}")
    cache = w.__dict__.setdefault("_packed", {})
    name = resolve_form(w.qtype, form)
    if name not in cache:
        cache[name] = pack(w, form)
    return cache[name]


# --------------------------------------------------------------------------- pack: rows of GGUF bytes -> planes
def _f16(b: torch.Tensor) -> torch.Tensor:
    """f16 [...] from little-endian bytes uint8 [..., 2]."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _nibbles_to_bytes(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, K/2] with byte j = q[2j] | q[2j+1] << 4, from 4-bit values [n, K]."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 2)
    return q[..., 0] | (q[..., 1] << 4)


def _pack_q4_k(rows: torch.Tensor, K: int) -> dict[str, torch.Tensor]:
    n = rows.shape[0]
    b = rows.reshape(-1, 144)  # [n*nb, 144]
    sc, m = _q4k_unpack_scales(b[:, 4:16])  # [B, 8] each
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, K)  # weight order
    dd = torch.stack([_f16(b[:, 0:2]), _f16(b[:, 2:4])], dim=1)  # [B, 2]
    return {"codes": _nibbles_to_bytes(q), "scales": torch.stack([sc, m], dim=2).reshape(n, -1),
            "dd": dd.reshape(n, -1)}


def _q2_k_levels(b: torch.Tensor) -> torch.Tensor:
    """2-bit levels uint8 [B, 256] in weight order from Q2_K blocks [B, 84]."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    return ((b[:, 16:80].reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)  # (h, s, l)


def _pack_q2_k(rows: torch.Tensor, K: int) -> dict[str, torch.Tensor]:
    n = rows.shape[0]
    b = rows.reshape(-1, 84)
    q = _q2_k_levels(b).reshape(n, K // 4, 4)
    codes = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
    dd = torch.stack([_f16(b[:, 80:82]), _f16(b[:, 82:84])], dim=1)
    return {"codes": codes, "scales": b[:, 0:16].reshape(n, -1), "dd": dd.reshape(n, -1)}


def _iq2_fields(b: torch.Tensor):
    """(d f16 [B], grid index uint8 [B, 32], sign word int64 [B, 8]) of IQ2_XXS blocks [B, 66]."""
    qs = b[:, 2:].reshape(-1, 8, 8)
    w = qs[..., 4:].to(torch.int64)
    word = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)
    return _f16(b[:, 0:2]), qs[..., :4].reshape(-1, 32), word


def _pack_iq2_compact(rows: torch.Tensor, K: int) -> dict[str, torch.Tensor]:
    n = rows.shape[0]
    d, gidx, word = _iq2_fields(rows.reshape(-1, 66))
    signs = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # same 32 bits, int32
    return {"grid": gidx.reshape(n, -1), "signs": signs.reshape(n, -1), "d": d.reshape(n, -1)}


def _pack_iq2_fast(rows: torch.Tensor, K: int) -> dict[str, torch.Tensor]:
    n = rows.shape[0]
    d, gidx, word = _iq2_fields(rows.reshape(-1, 66))
    dev = rows.device
    grid = _iq2.grid_u8(dev)[gidx.long()]  # [B, 32, 8] values 8 / 25 / 43
    c = (grid == 25).to(torch.uint8) + 2 * (grid == 43).to(torch.uint8)
    sidx = (word[..., None] >> torch.tensor([0, 7, 14, 21], device=dev)) & 127  # [B, 8, 4]
    ksign = _iq2.ksigns(dev)[sidx].to(torch.int32)  # [B, 8, 4], bit j = sign of weight j
    neg = ((ksign[..., None] >> torch.arange(8, device=dev, dtype=torch.int32)) & 1).to(torch.uint8)
    code = c.reshape(-1, 8, 4, 8) | (neg << 2)  # [B, 8 groups, 4 sub-vectors, 8]
    s = (word >> 28).to(torch.uint8).reshape(n, -1, 2)  # [n, K/64, 2]
    return {"codes": _nibbles_to_bytes(code.reshape(n, K)), "scales": s[..., 0] | (s[..., 1] << 4),
            "d": d.reshape(n, -1)}


def _pack_q8_0(rows: torch.Tensor, K: int) -> dict[str, torch.Tensor]:
    n = rows.shape[0]
    b = rows.reshape(-1, 34)
    return {"codes": b[:, 2:].contiguous().view(torch.int8).reshape(n, K), "d": _f16(b[:, 0:2]).reshape(n, -1)}


_PACK = {
    ("Q4_K", "planar"): _pack_q4_k,
    ("Q2_K", "planar"): _pack_q2_k,
    ("IQ2_XXS", "fast"): _pack_iq2_fast,
    ("IQ2_XXS", "compact"): _pack_iq2_compact,
    ("Q8_0", "planar"): _pack_q8_0,
}


# --------------------------------------------------------------------------- dequantize: planes -> float32
def _per(x: torch.Tensor, group: int) -> torch.Tensor:
    """[..., G] -> [..., G*group]: each value repeated for its ``group`` weights."""
    return x.unsqueeze(-1).expand(*x.shape, group).reshape(*x.shape[:-1], -1)


def _bytes_to_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*b.shape[:-1], -1)


def _dq_q4_k(p, shape):
    q = _bytes_to_nibbles(p["codes"]).float()
    sc, m = p["scales"][..., 0].float(), p["scales"][..., 1].float()
    d, dmin = _per(p["dd"][..., 0].float(), 8), _per(p["dd"][..., 1].float(), 8)
    # as gguf: d*sc and dmin*m in f32 first, then (d*sc)*q - dmin*m
    return _per(d * sc, 32) * q - _per(dmin * m, 32)


def _dq_q2_k(p, shape):
    c = p["codes"]
    q = torch.stack([(c >> (2 * i)) & 3 for i in range(4)], dim=-1).reshape(shape).float()
    s = p["scales"]
    d, dmin = _per(p["dd"][..., 0].float(), 16), _per(p["dd"][..., 1].float(), 16)
    return _per(d * (s & 0xF).float(), 16) * q - _per(dmin * (s >> 4).float(), 16)


def _dq_iq2_fast(p, shape):
    code = _bytes_to_nibbles(p["codes"])
    mag = torch.tensor([8.0, 25.0, 43.0, 0.0], device=code.device)[(code & 3).long()]
    sign = 1.0 - 2.0 * ((code >> 2) & 1).float()
    s = _bytes_to_nibbles(p["scales"]).float()  # [.., K/32]
    db = (_per(p["d"].float(), 8) * (0.5 + s)) * 0.25  # gguf's order
    return (_per(db, 32) * mag) * sign


def _dq_iq2_compact(p, shape):
    dev = p["d"].device
    word = p["signs"].to(torch.int64) & 0xFFFFFFFF  # [.., K/32]
    grid = _iq2.grid_u8(dev)[p["grid"].long()].float()  # [.., K/8, 8]
    sidx = (word[..., None] >> torch.tensor([0, 7, 14, 21], device=dev)) & 127  # [.., K/32, 4]
    ksign = _iq2.ksigns(dev)[sidx].to(torch.int32)
    neg = (ksign[..., None] >> torch.arange(8, device=dev, dtype=torch.int32)) & 1  # [.., K/32, 4, 8]
    s = (word >> 28).float()
    db = (_per(p["d"].float(), 8) * (0.5 + s)) * 0.25
    w = (_per(db, 32) * grid.reshape(shape)) * (1.0 - 2.0 * neg.reshape(shape).float())
    return w


def _dq_q8_0(p, shape):
    return p["codes"].float() * _per(p["d"].float(), 32)


_DEQUANT = {
    ("Q4_K", "planar"): _dq_q4_k,
    ("Q2_K", "planar"): _dq_q2_k,
    ("IQ2_XXS", "fast"): _dq_iq2_fast,
    ("IQ2_XXS", "compact"): _dq_iq2_compact,
    ("Q8_0", "planar"): _dq_q8_0,
}
