"""The registry of GGUF block formats moetile supports.

Names are accepted case-insensitively; the GGML spelling ("Q4_K", "Q2_K", "IQ2_XXS",
"Q8_0") is canonical. Block sizes come from ``gguf.constants.GGML_QUANT_SIZES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_MODULES = {"Q4_K": "q4_k", "Q2_K": "q2_k", "IQ2_XXS": "iq2_xxs", "Q8_0": "q8_0"}


@dataclass(frozen=True)
class QuantFormat:
    name: str  # canonical GGML spelling
    ggml_type: GGMLQuantizationType
    block_elems: int  # weights per block
    block_bytes: int  # bytes per block

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"moetile.quant.{_MODULES[self.name]}")

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of ``k`` weights; ``k`` must be a multiple of the block size."""
        if k <= 0 or k % self.block_elems:
            raise ValueError(
                f"{self.name}: K={k} must be a positive multiple of the block size {self.block_elems}"
            )
        return (k // self.block_elems) * self.block_bytes


def _make(name: str) -> QuantFormat:
    t = GGMLQuantizationType[name]
    elems, nbytes = GGML_QUANT_SIZES[t]
    return QuantFormat(name, t, elems, nbytes)


FORMATS: dict[str, QuantFormat] = {n: _make(n) for n in _MODULES}
QTYPES: tuple[str, ...] = tuple(FORMATS)


def canonical(qtype) -> str:
    """Canonical name of ``qtype`` (a str in any case, or a GGMLQuantizationType)."""
    if isinstance(qtype, GGMLQuantizationType):
        name = qtype.name
    elif isinstance(qtype, str):
        name = qtype.strip().upper()
    else:
        raise TypeError(f"quant type must be a str or GGMLQuantizationType, got {type(qtype).__name__}")
    if name not in FORMATS:
        raise ValueError(f"unknown quant type {qtype!r}; moetile supports {', '.join(QTYPES)}")
    return name


def get_format(qtype) -> QuantFormat:
    return FORMATS[canonical(qtype)]
