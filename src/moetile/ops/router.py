"""Batch-invariant router logits: one Triton launch with a fixed block shape (deterministic mode).

Letters: T tokens, H hidden size, E routed experts.
"""

from __future__ import annotations

import torch

from .. import schedule
from ._launch import interpreted, use_kernel


def router_logits_fixed(x: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """float32 [T, E] = x @ w_router.T, float32-accurate (3xTF32), each token's row computed the
    same way whatever T is and wherever the token sits (no batch-size-dependent algorithm choice, as
    cuBLAS makes). x: [T, H] float32/bfloat16/float16; w_router: [E, H] float16/bfloat16/float32
    (both checked by the caller, routing.router_logits)."""
    T, H = x.shape
    E = w_router.shape[0]
    out = torch.empty((T, E), dtype=torch.float32, device=x.device)
    if T == 0:
        return out
    x, w = x.contiguous(), w_router.contiguous()
    if not use_kernel(x.device, "router_logits"):
        # one [1, H] x [H, E] product per token: the same call for every token, so the same bits
        w32 = w.to(torch.float32).t()
        for t in range(T):
            out[t : t + 1] = x[t : t + 1].to(torch.float32) @ w32
        return out
    from ..kernels.router import router_logits_kernel

    cfg = schedule.router_config(interpreted())
    grid = (-(-T // cfg.block_t), -(-E // cfg.block_e))
    router_logits_kernel[grid](x, w, out, T, E, H, BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e,
                               BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
