"""Float64 reference of ds4 routing: the oracle for :mod:`moetile.routing` and the layer reference.

Same arguments as the routing functions; every step is computed in float64 with plain,
per-token Python where the rule matters (selection, hash lookup, the slot-order sum), so the
rules can be read off the code. Letters: T tokens, H hidden, E experts, k slots, V table rows.

The rules are those of routing.py: p = sqrt(softplus(z)) with ds4's CPU/CUDA softplus branches,
top-k of p + bias in descending order with the lower index first on ties and NaN last, hash rows
in table order with the bias ignored, w = (p[sel] / max(sum_slots p[sel], 2^-14)) * scale with the
unbiased p, token ids clamped into the table unless ``validate=True``, and expert ids outside
[0, E) counted as p = 0.
"""

from __future__ import annotations

import math

import torch

from .routing import WEIGHT_FLOOR, _check_route_args, _validate_expert_ids, _validate_token_ids


def router_logits_ref(x: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """float64 [T, E] = x @ w_router.T from the same (f16) weights, nothing rounded."""
    return x.double() @ w_router.double().t()


def softplus_ref(z: float) -> float:
    """ds4 CPU/CUDA softplus of one value, in float64."""
    if z > 20.0:
        return z
    if z < -20.0:
        return math.exp(z)
    return math.log1p(math.exp(z))


def ds4_scores_ref(logits: torch.Tensor) -> torch.Tensor:
    """float64 [T, E] p = sqrt(softplus(z)); NaN stays NaN."""
    z = logits.double()
    out = [[math.sqrt(softplus_ref(v)) if not math.isnan(v) else math.nan for v in row] for row in z.tolist()]
    return torch.tensor(out, dtype=torch.float64, device=logits.device).reshape(z.shape)


def select_topk_ref(scores: torch.Tensor, bias: torch.Tensor | None = None, k: int = 6) -> torch.Tensor:
    """int32 [T, k]: per token, experts by (score + bias) descending, lower index first, NaN last."""
    s = scores.double()
    if bias is not None:
        s = s + bias.double()
    ids = []
    for row in s.tolist():

        def rank(e: int, row=row) -> tuple[bool, float, int]:
            # NaN last; its value must stay out of the key (NaN compares unordered)
            nan = math.isnan(row[e])
            return (nan, 0.0 if nan else -row[e], e)

        ids.append(sorted(range(len(row)), key=rank)[:k])
    return torch.tensor(ids, dtype=torch.int32, device=scores.device).reshape(s.shape[0], k)


def hash_select_ref(token_ids: torch.Tensor, table: torch.Tensor, *, validate: bool = False) -> torch.Tensor:
    """int32 [T, k]: table row of each token (clamped into [0, V) unless validate=True)."""
    V, k = table.shape
    if validate:
        _validate_token_ids(token_ids.to(torch.int64), V)
    rows = table.tolist()
    out = [rows[min(max(t, 0), V - 1)] for t in token_ids.tolist()]
    return torch.tensor(out, dtype=torch.int32, device=table.device).reshape(len(out), k)


def route_weights_ref(scores: torch.Tensor, ids: torch.Tensor, scale: float = 1.5) -> torch.Tensor:
    """float64 [T, k]: (p[sel] / max(p[sel] summed over slots 0..k-1, 2^-14)) * scale."""
    E = scores.shape[1]
    out = []
    for p_row, sel in zip(scores.double().tolist(), ids.tolist(), strict=True):
        w_raw = [p_row[e] if 0 <= e < E else 0.0 for e in sel]
        total = 0.0
        for w in w_raw:
            total += w
        total = total if math.isnan(total) else max(total, WEIGHT_FLOOR)
        out.append([(w / total) * scale for w in w_raw])
    return torch.tensor(out, dtype=torch.float64, device=scores.device).reshape(ids.shape)


def route_ref(
    x: torch.Tensor,
    w_router: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    hash_table: torch.Tensor | None = None,
    k: int = 6,
    scale: float = 1.5,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 [T, k], weights float64 [T, k]) of routing.route, computed in float64."""
    _check_route_args(x, w_router, bias, token_ids, hash_table, k, scale)
    p = ds4_scores_ref(router_logits_ref(x, w_router))  # [T, E]
    if hash_table is not None:
        ids = hash_select_ref(token_ids, hash_table, validate=validate)
        if validate:
            _validate_expert_ids(ids, w_router.shape[0], "hash table rows")
    else:
        ids = select_topk_ref(p, bias, k)
    return ids, route_weights_ref(p, ids, scale)
