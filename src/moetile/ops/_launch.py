"""Where a kernel can run: CUDA, or CPU through Triton's interpreter."""

from __future__ import annotations

import functools
import warnings

import torch


def interpreted() -> bool:
    """True when the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from ..kernels.mm_id import mul_mm_id_kernel

    return isinstance(mul_mm_id_kernel, InterpretedFunction)


def use_kernel(device: torch.device, op: str) -> bool:
    """Run the Triton kernel for tensors on ``device``? Warn once per op when falling back."""
    if device.type == "cuda":
        return True
    if interpreted():
        return True
    _warn_fallback(op)
    return False


@functools.cache
def _warn_fallback(op: str) -> None:
    warnings.warn(
        f"moetile.{op}: CPU tensors and no TRITON_INTERPRET=1, so the torch reference runs "
        "instead of the Triton kernel (slow; set TRITON_INTERPRET=1 before importing moetile "
        "to run the kernel through Triton's interpreter)",
        RuntimeWarning,
        stacklevel=4,
    )


@functools.cache
def _iq2_codes(device: str) -> torch.Tensor:
    from ..quant import iq2_xxs

    grid = iq2_xxs.grid_u8().to(torch.int32)  # [256, 8], values 8 / 25 / 43
    code = (grid == 25).to(torch.int32) + 2 * (grid == 43).to(torch.int32)
    if not bool(((grid == 8) | (grid == 25) | (grid == 43)).all()):
        raise RuntimeError("IQ2_XXS grid holds values other than 8, 25, 43")
    shifts = 2 * torch.arange(8, dtype=torch.int32)
    return (code << shifts).sum(1).to(torch.int32).to(device).contiguous()  # [256]


def table_for(qtype: str, device: torch.device) -> torch.Tensor | None:
    """The lookup table a kernel needs for ``qtype`` on ``device`` (IQ2_XXS: int32 [256] grid
    codes, 2 bits per weight), or None."""
    return _iq2_codes(str(device)) if qtype == "IQ2_XXS" else None
