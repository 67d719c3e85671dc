"""QuantTensor: the one representation of a GGUF-quantized weight tensor in moetile.

Layout is GGUF's own: per output row, a run of blocks along K (the input dimension).
``data`` is uint8 of shape ``(*shape[:-1], row_bytes)`` with
``row_bytes = (K // block_elems) * block_bytes``; ``shape`` is the logical float shape,
``(E, N, K)`` for a stack of experts or ``(N, K)`` for a plain matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import refuse_meta, resolve
from .formats import QuantFormat, get_format


@dataclass(frozen=True)
class QuantTensor:
    data: torch.Tensor  # uint8 [*shape[:-1], row_bytes]
    qtype: str  # canonical GGML spelling, e.g. "Q4_K"
    shape: tuple[int, ...]  # logical (E, N, K) or (N, K)

    def __post_init__(self) -> None:
        fmt = get_format(self.qtype)  # raises on an unknown type
        object.__setattr__(self, "qtype", fmt.name)
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.data, torch.Tensor):
            raise TypeError(f"QuantTensor.data must be a torch.Tensor, got {type(self.data).__name__}")
        if self.data.dtype != torch.uint8:
            raise TypeError(f"QuantTensor.data must be uint8 raw blocks, got dtype {self.data.dtype}")
        refuse_meta("QuantTensor.data", self.data)
        if len(shape) not in (2, 3):
            raise ValueError(f"QuantTensor shape must be (N, K) or (E, N, K), got {shape}")
        if any(s <= 0 for s in shape):
            raise ValueError(f"QuantTensor shape must be positive, got {shape}")
        row_bytes = fmt.row_bytes(shape[-1])  # raises if K is not a multiple of the block size
        want = (*shape[:-1], row_bytes)
        if tuple(self.data.shape) != want:
            if self.data.numel() == _prod(want):
                object.__setattr__(self, "data", self.data.reshape(want))
            else:
                raise ValueError(
                    f"{fmt.name} tensor of logical shape {shape} needs {_prod(want)} bytes "
                    f"({want}), got data of shape {tuple(self.data.shape)} ({self.data.numel()} bytes)"
                )
        if not self.data.is_contiguous():
            object.__setattr__(self, "data", self.data.contiguous())

    @property
    def format(self) -> QuantFormat:
        return get_format(self.qtype)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def row_bytes(self) -> int:
        return self.data.shape[-1]

    @property
    def num_experts(self) -> int:
        if len(self.shape) != 3:
            raise ValueError(f"not an expert stack: shape {self.shape}")
        return self.shape[0]

    def to(self, device) -> QuantTensor:
        return QuantTensor(self.data.to(resolve(device)), self.qtype, self.shape)

    def expert(self, e: int) -> QuantTensor:
        """The (N, K) matrix of expert ``e`` (a view, no copy)."""
        n_exp = self.num_experts
        if not -n_exp <= e < n_exp:
            raise IndexError(f"expert {e} out of range for {n_exp} experts")
        return QuantTensor(self.data[e], self.qtype, self.shape[1:])

    def experts(self, start: int, stop: int) -> QuantTensor:
        """The (stop - start, N, K) stack of experts start..stop-1 (a view, no copy)."""
        if not 0 <= start < stop <= self.num_experts:
            raise IndexError(f"experts [{start}, {stop}) out of range for {self.num_experts} experts")
        return QuantTensor(self.data[start:stop], self.qtype, (stop - start, *self.shape[1:]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float tensor of ``shape`` (float32 math, then cast to ``dtype``)."""
        return self.format.module.dequantize(self.data).reshape(self.shape).to(dtype)

    def __repr__(self) -> str:
        return f"QuantTensor({self.qtype}, shape={self.shape}, device={self.device}, nbytes={self.nbytes})"


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
