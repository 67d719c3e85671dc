"""Launchers of the small elementwise kernels (SwiGLU + route weight, slot sum)."""

from __future__ import annotations

import torch

from ..kernels.elementwise import combine_slots_kernel, swiglu_weight_kernel

BLOCK = 1024


def swiglu_weight(gate: torch.Tensor, up: torch.Tensor, route_weights: torch.Tensor, mid: torch.Tensor,
                  wide: tuple[torch.Tensor, torch.Tensor, int] | None = None, clamp: float = 10.0) -> torch.Tensor:
    """mid f16 [P, F] = silu(min(gate, C)) * clamp(up, -C, C) * route_weights[:, None], C = ``clamp``;
    gate/up f32 [P, F], route_weights f32 [P]. With ``wide`` = (ids int32 [P], counts int32
    [E+1], min_rows) only the rows of pairs whose expert holds at least min_rows pairs are written;
    the others keep what ``mid`` holds."""
    P, F = gate.shape
    if P:
        ids, counts, min_rows = wide if wide is not None else (route_weights, route_weights, 0)
        swiglu_weight_kernel[(P, -(-F // BLOCK))](gate, up, route_weights, mid, ids, counts, F,
                                                   counts.numel() - 1, min_rows, CLAMP=float(clamp),
                                                   SELECT=wide is not None, BLOCK=BLOCK)
    return mid


def combine_slots(y: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """out f32 [T, H] = sum over slots of y f32 [T, k, H] in slot order 0..k-1, plus ``add`` [T, H].
    With ``rows`` (int64 [T, k]) slot s of token t is read from row rows[t, s] of y [T*k, H] (pairs
    that arrived in another order: expert parallelism), so no copy puts them in place first. The
    index's values are not checked (that would sync with the host): this internal op's callers pass a
    permutation of y's rows."""
    T, H = out.shape
    if rows is None:
        k = y.shape[1]
    else:
        if rows.dim() != 2 or rows.shape[0] != T or rows.device != y.device or y.dim() != 2 or y.shape[1] != H:
            raise ValueError(f"combine_slots: rows must be [T={T}, k] on {y.device} with y [rows, {H}], got rows "
                             f"{tuple(rows.shape)} on {rows.device} and y {tuple(y.shape)}")
        k = rows.shape[1]
        rows = rows.to(torch.int64).contiguous()  # row * H in int64
    if T:
        combine_slots_kernel[(T, -(-H // BLOCK))](
            y, add if add is not None else y, rows if rows is not None else y, out, H, TOPK=k,
            HAS_ADD=add is not None, HAS_ROWS=rows is not None, BLOCK=BLOCK
        )
    return out
