"""``route``: the ds4 router of the layer, two Triton launches (logit chunks, then scores + top-k or
hash + weights), batch-invariant; the torch steps of moetile.routing where no kernel runs.

Letters: T tokens, H hidden size, E routed experts, k experts per token, S H-chunks, V hash rows.
"""

from __future__ import annotations

import torch

from .. import routing, schedule
from ._launch import interpreted, use_kernel


def route(
    x: torch.Tensor,
    w_router: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    hash_table: torch.Tensor | None = None,
    k: int = 6,
    scale: float = 1.5,
    validate: bool = False,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 [T, k], weights f32 [T, k]): the same arguments and rules as routing.route.

    On CUDA (or through the interpreter) two kernels (kernels/router.py): logits as 3xTF32 in fixed
    chunks of H, then everything else per token; no host sync unless ``validate``, and a token's
    ids and weights do not depend on the batch. Elsewhere routing.route's torch steps, token by
    token when ``deterministic`` (so no BLAS call's shape depends on the batch)."""
    routing._check_route_args(x, w_router, bias, token_ids, hash_table, k, scale)
    T, H = x.shape
    E = w_router.shape[0]
    kw = dict(bias=bias, hash_table=hash_table, k=k, scale=scale, validate=validate)
    if not use_kernel(x.device, "route"):
        if not deterministic or T <= 1:
            return routing.route(x, w_router, token_ids=token_ids, **kw)
        parts = [routing.route(x[t : t + 1], w_router, token_ids=None if token_ids is None else token_ids[t : t + 1],
                               **kw) for t in range(T)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if validate and hash_table is not None:  # names the first bad token id / table entry (syncs)
        routing.hash_select(token_ids, hash_table, validate=True, n_experts=E)
    ids = torch.empty((T, k), dtype=torch.int32, device=x.device)
    wts = torch.empty((T, k), dtype=torch.float32, device=x.device)
    if T == 0:
        return ids, wts
    cfg = schedule.router_config(H, interpreted())
    S = -(-H // cfg.h_chunk)
    part = torch.empty((S, T, E), dtype=torch.float32, device=x.device)
    from ..kernels.router import route_select_kernel, router_logits_kernel

    x, w = x.contiguous(), w_router.contiguous()
    router_logits_kernel[(-(-T // cfg.block_t), -(-E // cfg.block_e), S)](
        x, w, part, T, E, H, cfg.h_chunk, BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    hashed = hash_table is not None
    if hashed:
        V = hash_table.shape[0]
        tok = token_ids.to(torch.int64).clamp(0, V - 1).to(torch.int32)  # int64 ids >= 2^31 must not wrap
        table = routing.table_ids_int32(hash_table).contiguous()
    else:
        V, tok, table = 1, ids, ids
    b = bias.to(torch.float32).contiguous() if bias is not None and not hashed else wts
    block_e = max(16, 1 << (E - 1).bit_length())
    select_t = max(1, min(cfg.select_t, 16384 // block_e))  # many experts: fewer tokens per program
    route_select_kernel[(-(-T // select_t),)](
        part, b, tok, table, ids, wts, T, E, V, S, float(scale), TOPK=k, HAS_BIAS=bias is not None and not hashed,
        HASH=hashed, BLOCK_T=select_t, BLOCK_E=block_e, BLOCK_K=max(2, 1 << (k - 1).bit_length()),
        num_warps=cfg.select_warps,
    )
    return ids, wts
