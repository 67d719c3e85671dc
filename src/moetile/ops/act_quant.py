"""``quantize_act``: activations as two-level int8 words for the integer mat-vec (kernels/qdot.py).

Letters: R rows (tokens or pairs), K inputs, B = K/32 blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.act_quant import act_quant_kernel
from ._launch import interpreted

# the byte layout each weight form reads (kernels/qdot.py): 0 NATURAL, 1 Q4K, 2 Q2K
_LAYOUTS = {("IQ2_XXS", "fast"): 0, ("IQ2_XXS", "compact"): 0, ("Q8_0", "planar"): 0,
            ("Q4_K", "planar"): 1, ("Q2_K", "planar"): 2}


@dataclass(frozen=True)
class QAct:
    """x ~= scales/256-weighted words, per row and 32-block (kernels/act_quant.py's docstring).
    words int32 [R, B, 16], scales f32 [R, B] (dx/256), sums int32 [R, 2B] (sum of 256*qh + ql
    per 16 inputs), layout 0/1/2."""

    words: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor
    layout: int

    @property
    def rows(self) -> int:
        return self.words.shape[0]


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def act_layout(w) -> int:
    """The activation layout a PackedTensor's form reads."""
    return _LAYOUTS[(w.qtype, w.form)]


def quantize_act(x: torch.Tensor, layout: int) -> QAct:
    """x f32/f16/bf16 [..., K] (K a multiple of 32, rows contiguous) -> QAct of its R = numel/K rows."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.dtype not in _FLOATS:
        raise TypeError(f"quantize_act: x must be a float32/float16/bfloat16 tensor [..., K], got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of {getattr(x, 'dim', lambda: '?')()} dims")
    K = x.shape[-1]
    if K == 0 or K % 32:
        raise ValueError(f"quantize_act: K = {K} is not a positive multiple of 32")
    if type(layout) is not int or layout not in (0, 1, 2):
        raise ValueError(f"quantize_act: layout must be 0, 1 or 2, got {layout!r}")
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    R, B = x2.shape[0], K // 32
    buf = torch.empty(R * B * 19, dtype=torch.int32, device=x.device)  # one allocation: decode is host-bound
    words = buf[: R * B * 16].view(R, B, 16)
    scales = buf[R * B * 16 : R * B * 17].view(torch.float32).view(R, B)
    sums = buf[R * B * 17 :].view(R, 2 * B)
    if R:
        bb = 32 if interpreted() else 4
        act_quant_kernel[(R, -(-B // bb))](x2, words, scales, sums, B, x2.stride(0), LAYOUT=layout, BLOCK_B=bb)
    return QAct(words, scales, sums, layout)
