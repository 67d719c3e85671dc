"""Float64 torch references of every moetile op: the oracle the kernels are tested against.

They take the same arguments as the public wrappers. ``round_f16=True`` rounds the operands
to f16 first (dequantized weights and activations), as the kernels and ds4's Metal prefill do,
so the comparison isolates accumulation error from operand rounding.
"""

from __future__ import annotations

import torch

from .quant import QuantTensor


def mul_mm_id_ref(
    rhs: torch.Tensor, w: QuantTensor, topk_ids: torch.Tensor, *, round_f16: bool = False
) -> torch.Tensor:
    """float64 [T, k, N]: out[t, s] = dequant(W[topk_ids[t, s]]) @ rhs_row(t, s).

    ``rhs`` is [T, K] (one row per token) or [T, k, K] (one row per pair). Pairs whose expert
    id is outside [0, E) get NaN rows, as the kernel writes them.
    """
    T, k = topk_ids.shape
    E, N, K = w.shape
    x = rhs.double()
    if round_f16:
        x = rhs.to(torch.float16).double()
    if x.dim() == 2:
        x = x[:, None, :].expand(T, k, K)
    x = x.reshape(T * k, K)
    ids = topk_ids.reshape(-1).to(torch.int64)
    out = torch.full((T * k, N), float("nan"), dtype=torch.float64, device=rhs.device)
    for e in torch.unique(ids).tolist():
        if not 0 <= e < E:
            continue
        sel = (ids == e).nonzero().squeeze(1)
        we = w.expert(e).dequantize()
        we = we.to(torch.float16).double() if round_f16 else we.double()
        out[sel] = x[sel] @ we.T
    return out.reshape(T, k, N)
