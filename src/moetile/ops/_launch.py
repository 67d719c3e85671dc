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
def _iq2_tables(device: str) -> torch.Tensor:
    """int32 [384] for the IQ2_XXS compact decoder: 256 grid words (nibble j = class 0/1/2 of grid
    value j: 8/25/43), then 128 sign words (bit 4j+2 = sign of weight j, from gguf's KSIGNS)."""
    from ..quant import iq2_xxs

    grid = iq2_xxs.grid_u8().to(torch.int64)  # [256, 8]
    if not bool(((grid == 8) | (grid == 25) | (grid == 43)).all()):
        raise RuntimeError("IQ2_XXS grid holds values other than 8, 25, 43")
    cls = (grid == 25).to(torch.int64) + 2 * (grid == 43).to(torch.int64)
    j = torch.arange(8, dtype=torch.int64)
    gw = (cls << (4 * j)).sum(1)
    neg = (iq2_xxs.ksigns().to(torch.int64)[:, None] >> j) & 1  # [128, 8]
    sw = (neg << (4 * j + 2)).sum(1)
    words = torch.cat([gw, sw])
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(device)


_FORM_IDS = {("Q4_K", "planar"): 12, ("Q2_K", "planar"): 10, ("IQ2_XXS", "fast"): 16,
             ("IQ2_XXS", "compact"): 17, ("Q8_0", "planar"): 8}
# the word type each plane is read as (kernels/decode.py); None: as stored
_WORDS = {("Q4_K", "planar"): (torch.int32, torch.int16, torch.int32),
          ("Q2_K", "planar"): (torch.int16, None, torch.int32),
          ("IQ2_XXS", "fast"): (torch.int32, None, None),
          ("IQ2_XXS", "compact"): (None, None, None),
          ("Q8_0", "planar"): (torch.int32, None)}


def form_id(w) -> int:
    """The constexpr FORM of a PackedTensor's form."""
    return _FORM_IDS[(w.qtype, w.form)]


def kernel_planes(w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A PackedTensor's planes as the kernels read them (viewed as words, see kernels/decode.py; a
    form with two planes repeats its last as an unused third)."""
    words = _WORDS[(w.qtype, w.form)]
    planes = [p if t is None else p.view(t) for p, t in zip((w.planes[n] for n in w.plane_order), words, strict=True)]
    while len(planes) < 3:
        planes.append(planes[-1])
    return tuple(planes)


def tables_for(w, device: torch.device) -> torch.Tensor | None:
    """The lookup table a kernel needs for the PackedTensor ``w`` on ``device``, or None."""
    return _iq2_tables(str(device)) if (w.qtype, w.form) == ("IQ2_XXS", "compact") else None
