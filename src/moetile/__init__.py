"""moetile: routed Mixture-of-Experts on GGUF-quantized experts, with Triton kernels.

Attributes are imported lazily, so that `moetile.cli` can set TRITON_INTERPRET (CPU-only
machines) before any Triton kernel is decorated.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "QTYPES": "moetile.quant",
    "QuantTensor": "moetile.quant",
    "dequantize": "moetile.quant",
    "quantize": "moetile.quant",
    "random_blocks": "moetile.quant",
    "PackedTensor": "moetile.quant.pack",
    "pack": "moetile.quant.pack",
    "mul_mm_id": "moetile.ops.mul_mm_id",
    "mul_mv_id": "moetile.ops.mul_mv_id",
    "DS4MoE": "moetile.moe",
    "MoEWeights": "moetile.moe",
    "moe_forward": "moetile.moe",
    "mul_mm_id_mapped": "moetile.ops.mul_mm_id",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moetile' has no attribute {name!r}")
