"""GGUF block formats: dequantize, quantize and random valid blocks, one module per type.

Each type module (``q4_k``, ``q2_k``, ``iq2_xxs``, ``q8_0``) provides, on rows of raw bytes:

- ``dequantize(data: uint8 [..., row_bytes]) -> float32 [..., K]``
- ``quantize(x: float [..., K], importance: float [K] | None) -> uint8 [..., row_bytes]``
- ``random_blocks(shape: (..., K), generator, device) -> uint8 [..., row_bytes]``

and this package wraps them for ``QuantTensor``.
"""

from __future__ import annotations

import torch

from .formats import FORMATS, QTYPES, QuantFormat, canonical, get_format
from .tensor import QuantTensor

__all__ = [
    "FORMATS",
    "QTYPES",
    "QuantFormat",
    "QuantTensor",
    "canonical",
    "dequantize",
    "get_format",
    "quantize",
    "random_blocks",
]


def dequantize(blocks, qtype=None, shape=None) -> torch.Tensor:
    """Float32 values of raw GGUF blocks.

    ``blocks`` is a QuantTensor, or a uint8 tensor [..., row_bytes] together with ``qtype``
    (then the result is [..., K], or ``shape`` if given).
    """
    if isinstance(blocks, QuantTensor):
        return blocks.dequantize()
    if qtype is None:
        raise TypeError("dequantize: qtype is required when blocks is a raw uint8 tensor")
    fmt = get_format(qtype)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        got = getattr(blocks, "dtype", type(blocks))
        raise TypeError(f"dequantize: blocks must be a uint8 torch.Tensor, got {got}")
    if blocks.dim() == 0 or blocks.shape[-1] % fmt.block_bytes:
        raise ValueError(
            f"dequantize: last dimension ({tuple(blocks.shape)}) must be a multiple of the "
            f"{fmt.name} block size of {fmt.block_bytes} bytes"
        )
    out = fmt.module.dequantize(blocks.contiguous())
    return out.reshape(shape) if shape is not None else out


def quantize(x: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> QuantTensor:
    """Quantize float32/bf16/f16 weights [..., K] (2-D or 3-D) into a QuantTensor.

    ``importance`` is an optional per-column weight [K] (as an imatrix gives); it steers
    the error the quantizer minimises. Runs on the device of ``x``.
    """
    fmt = get_format(qtype)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"quantize: x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() not in (2, 3):
        raise ValueError(f"quantize: x must be (N, K) or (E, N, K), got shape {tuple(x.shape)}")
    fmt.row_bytes(x.shape[-1])  # validates K
    if importance is not None:
        if not isinstance(importance, torch.Tensor) or not importance.is_floating_point():
            raise TypeError(f"quantize: importance must be a float tensor [K], got {type(importance).__name__}")
        if importance.shape != (x.shape[-1],):
            raise ValueError(f"quantize: importance must have shape ({x.shape[-1]},), got {tuple(importance.shape)}")
        importance = importance.to(device=x.device, dtype=torch.float32)
    data = fmt.module.quantize(x.float(), importance)
    return QuantTensor(data, fmt.name, tuple(x.shape))


def random_blocks(qtype, shape, generator: torch.Generator | None = None, device=None) -> QuantTensor:
    """Valid random blocks of logical ``shape`` ((N, K) or (E, N, K)) with realistic
    magnitudes (values like real weights, std about 0.02; finite f16 scales; never zeros)."""
    fmt = get_format(qtype)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"random_blocks: shape must be (N, K) or (E, N, K), got {shape}")
    fmt.row_bytes(shape[-1])
    data = fmt.module.random_blocks(shape, generator=generator, device=device)
    return QuantTensor(data, fmt.name, shape)
