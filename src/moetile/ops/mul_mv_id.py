"""``mul_mv_id``: decode-path mat-vec over the selected experts, float32 activations.

Letters: T tokens, k slots, P = T*k pairs, E experts, N output rows, K inputs.
"""

from __future__ import annotations

import torch

from .. import schedule
from ..kernels.mv_id import mul_mv_id_kernel
from ..quant import QuantTensor
from ._launch import interpreted, table_for
from .mul_mm_id import QTYPE_IDS


def mul_mv_id(
    rhs: torch.Tensor,
    w: QuantTensor,
    topk_ids: torch.Tensor,
    *,
    out: torch.Tensor,
    w_up: QuantTensor | None = None,
    route_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [P, N] f32 = dequant(w[ids[p]]) @ rhs_row(p), all float32.

    rhs: [T, K] (per token) or [T, k, K] (per pair). With ``w_up`` (and ``route_weights`` f32
    [P]) the fused gate+up variant writes mid = silu(min(g, 10)) * clamp(u, -10, 10) * w.
    Ids outside [0, E) give NaN rows and read nothing. Inputs are assumed checked by the caller.
    """
    E, N, K = w.shape
    T, k = topk_ids.shape
    P = T * k
    if P == 0:
        return out
    per_pair = rhs.dim() == 3
    rhs2 = rhs.reshape(-1, K)
    ids = topk_ids.reshape(-1).to(torch.int32)
    fused = w_up is not None
    table = table_for(w.qtype, w.device)
    block_n = schedule.mv_block_n(interpreted())
    grid = (-(-N // block_n), P)
    mul_mv_id_kernel[grid](
        w.data,
        w_up.data if fused else w.data,
        table if table is not None else w.data,
        rhs2,
        ids,
        route_weights if fused else ids,
        out,
        N,
        K,
        w.row_bytes,
        N * w.row_bytes,
        rhs2.stride(0),
        k,
        E,
        QTYPE=QTYPE_IDS[w.qtype],
        RHS_PER_PAIR=per_pair,
        FUSE_SWIGLU=fused,
        CLAMP=10.0,
        BLOCK_N=block_n,
        num_warps=2,
    )
    return out
