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


def swiglu_ref(g: torch.Tensor, u: torch.Tensor, w, clamp: float = 10.0) -> torch.Tensor:
    """silu(min(g, C)) * clamp(u, -C, C) * w in float64 (ds4 §3.2-3.3: gate clamped above
    only, up both ways, the route weight applied before the down projection)."""
    g = torch.clamp(g.double(), max=clamp)
    u = torch.clamp(u.double(), -clamp, clamp)
    return g / (1.0 + torch.exp(-g)) * u * w


def ds4_moe_ref(
    x: torch.Tensor,
    weights,
    token_ids: torch.Tensor | None = None,
    *,
    topk_ids: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    include_shared: bool = True,
    round_f16: bool = False,
) -> torch.Tensor:
    """float64 [T, H]: the whole routed FFN of ds4 §3.7 plus the shared expert (§3.6).

    Same arguments as moe.moe_forward. Routing uses reference_routing.route_ref unless
    topk_ids/topk_weights are given. A pair whose expert id is outside [0, E) gets a NaN row (so
    its token's output is NaN), as in moe_forward with ``validate=False``. ``round_f16`` rounds x,
    dequantized weights and mid to f16 as the prefill kernels do; the slot sum is in slot order.
    """
    from .reference_routing import route_ref

    if topk_ids is None:
        topk_ids, topk_weights = route_ref(
            x, weights.router, bias=weights.bias, token_ids=token_ids, hash_table=weights.hash_table,
            k=weights.top_k, scale=weights.scale,
        )
    T, k = topk_ids.shape
    rw = topk_weights.double()
    xs = x.to(torch.float16).double() if round_f16 else x.double()
    ids = topk_ids.to(torch.int64)
    y = torch.zeros((T, k, weights.down.shape[1]), dtype=torch.float64, device=x.device)
    E = weights.gate.shape[0]
    for e in torch.unique(ids).tolist():
        sel = (ids == e).nonzero()
        t, s = sel[:, 0], sel[:, 1]
        if not 0 <= e < E:  # as the kernels do: the pair's row is NaN, nothing is read for it
            y[t, s] = float("nan")
            continue
        y[t, s] = _expert_ref(xs[t], weights.gate.expert(e), weights.up.expert(e), weights.down.expert(e),
                              rw[t, s], round_f16, weights.clamp)
    out = y[:, 0].clone()
    for s in range(1, k):
        out += y[:, s]
    if include_shared and weights.shared_gate is not None:
        out += shared_ref(x, weights, round_f16)
    return out


def shared_ref(x: torch.Tensor, weights, round_f16: bool = False) -> torch.Tensor:
    """float64 [T, H]: the shared expert of every token (weight 1); ``round_f16`` as in ds4_moe_ref."""
    xs = x.to(torch.float16).double() if round_f16 else x.double()
    return _expert_ref(xs, weights.shared_gate, weights.shared_up, weights.shared_down,
                       torch.ones(x.shape[0], dtype=torch.float64, device=x.device), round_f16, weights.clamp)


def _expert_ref(x, gate, up, down, w, round_f16, clamp):
    """float64 [R, H]: down(swiglu_C(gate x, up x) * w) for rows x [R, H] of one expert, C = ``clamp``."""
    deq = lambda q: q.dequantize().to(torch.float16).double() if round_f16 else q.dequantize().double()
    mid = swiglu_ref(x @ deq(gate).T, x @ deq(up).T, w[:, None], clamp)
    if round_f16:
        mid = mid.to(torch.float16).double()
    return mid @ deq(down).T


def tile_list_ref(counts: torch.Tensor, width: int, n_tiles: int, min_rows: int = 0,
                  max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, first row) int64 [n_tiles] of schedule.build_tiles, in torch: experts (bins 0..E-1
    of ``counts`` [E+1]) with ``min_rows <= count < max_rows`` cut into tiles of ``width``, in
    order; the last bin (invalid ids) in the class from 0 rows; surplus tiles: last bin, row 2^31-1."""
    c = counts.to(torch.int64).cpu()
    keep = (c >= min_rows) & (c < (max_rows if max_rows is not None else 2**31 - 1))
    keep[-1] = min_rows == 0
    per = torch.where(keep, (c + width - 1) // width, torch.zeros_like(c))
    expert, row = [], []
    for e, n in enumerate(per.tolist()):
        expert += [e] * n
        row += [j * width for j in range(n)]
    pad = n_tiles - len(expert)
    assert pad >= 0, f"{len(expert)} tiles do not fit the bound {n_tiles}"
    return torch.tensor(expert + [c.numel() - 1] * pad), torch.tensor(row + [2**31 - 1] * pad)


def act_source_index(layout: int) -> torch.Tensor:
    """int64 [16, 4]: the input (0..31 of a block) of byte j of word u in an activation layout
    (kernels/qdot.py), and which level the word holds: returned as (src, level)."""
    u = torch.arange(16)[:, None]
    j = torch.arange(4)[None, :]
    if layout == 0:
        return 8 * (u // 4) + 4 * (u % 2) + j, (u // 2) % 2
    if layout == 1:
        return 8 * (u // 4) + 2 * j + (u % 2), (u // 2) % 2
    return 16 * (u // 8) + (u % 4) + 4 * j, (u // 4) % 2


def act_quant_ref(x: torch.Tensor, layout: int):
    """(words int32 [R, B, 16], scales f32 [R, B], sums int32 [R, 2B]) as kernels/act_quant.py
    computes them, in float32 torch (x [R, K])."""
    R, K = x.shape
    xb = x.float().reshape(R, K // 32, 32)
    src, lev = (t.to(x.device) for t in act_source_index(layout))
    xs = xb[:, :, src]  # [R, B, 16, 4]
    amax = xb.abs().amax(-1)
    has_nan = torch.isnan(xb).any(-1)
    up = torch.where(amax < 2.0**-100, 2.0**100, 1.0)  # 127/amax would overflow: scale up (exact)
    xs = xs * up[..., None, None]
    amax = amax * up
    dx = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))

    def r127(v):
        r = torch.floor(v + 0.5).clamp(-127.0, 127.0)
        return torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)

    qh = r127(xs * inv[..., None, None])
    ql = r127((xs - qh * dx[..., None, None]) * (inv * 256.0)[..., None, None])
    q = torch.where(lev.bool(), ql, qh).to(torch.int64)
    b = q & 255
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    a = torch.where(lev.bool(), q, q * 256)  # [R, B, 16, 4]
    sums = a.reshape(R, K // 32, 2, 32).sum(-1).reshape(R, K // 16).to(torch.int32)
    scales = torch.where(has_nan, torch.full_like(dx, float("nan")), dx / 256.0 / up)
    return words, scales, sums


def act_dequant_ref(words: torch.Tensor, scales: torch.Tensor, layout: int) -> torch.Tensor:
    """float64 [R, K]: the activations the integer mat-vec multiplies, x^ = dx/256 * (256*qh + ql)."""
    R, B, _ = words.shape
    src, lev = (t.to(words.device) for t in act_source_index(layout))
    w = words.to(torch.int64)
    q = torch.stack([((w >> (8 * j)) & 255) for j in range(4)], -1)  # [R, B, 16, 4]
    q = torch.where(q >= 128, q - 256, q)
    a = torch.where(lev.bool(), q, q * 256)
    out = torch.zeros((R, B, 32), dtype=torch.int64, device=words.device)
    out.scatter_add_(2, src.reshape(1, 1, 64).expand(R, B, 64), a.reshape(R, B, 64))
    return (out.double() * scales.double()[..., None]).reshape(R, B * 32)
