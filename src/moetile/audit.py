"""The audit: the harness that would have caught ds4's wide-tile bug (reference §6).

For every tile width and every per-expert row count R, route R pairs to one expert (and, in a
second scenario, spread pairs randomly over many experts), run ``mul_mm_id`` on a NaN-poisoned
output, and compare every row with the float64 reference on f16-rounded operands. A row fails
if it holds NaN (never written) or its relative error exceeds ``bound``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops.mul_mm_id import mul_mm_id
from .quant import random_blocks
from .quant.pack import pack
from .reference import mul_mm_id_ref

# Against a reference that rounds the same operands to f16, only float32 accumulation differs:
# about sqrt(K) * 2^-24 relative (< 1e-5 for K <= 4096). 1e-4 leaves room for accumulation
# order and still flags any unwritten, half-written or mis-scaled row (errors of order 1).
ROW_BOUND = 1e-4


@dataclass(frozen=True)
class AuditRow:
    scenario: str  # "one-expert" or "random"
    width: int
    rows: int  # R: pairs on the hot expert (one-expert) or total pairs (random)
    bad_rows: int
    first_bad: int | None  # pair index of the first failing row, or None
    max_err: float

    @property
    def ok(self) -> bool:
        return self.bad_rows == 0


def run_audit(
    qtype: str,
    n: int,
    k: int,
    rows: list[int],
    widths: list[int],
    *,
    rhs: str = "f32",
    form: str = "auto",
    experts: int = 8,
    device: str = "cpu",
    seed: int = 0,
    op: Callable = mul_mm_id,
    bound: float = ROW_BOUND,
    progress: Callable[[int], None] | None = None,
) -> list[AuditRow]:
    """Audit table rows for every (scenario, width, R). ``rhs`` is "f32" (one row per token)
    or "f16" (one row per pair); ``form`` the packed form of the weights (moetile.quant.pack).
    ``op`` is the function under test (mul_mm_id's signature)."""
    if rhs not in ("f32", "f16"):
        raise ValueError(f"rhs must be 'f32' or 'f16', got {rhs!r}")
    if experts < 2:
        raise ValueError(f"the audit needs at least 2 experts, got {experts}")
    g = torch.Generator(device=device).manual_seed(seed)
    w = pack(random_blocks(qtype, (experts, n, k), generator=g, device=device), form)
    out_rows = []
    for scenario in ("one-expert", "random"):
        for r in rows:
            topk = _routing(scenario, r, experts, g, device)
            T, kk = topk.shape
            if rhs == "f32":
                x = torch.randn(T, k, generator=g, device=device)
            else:
                x = torch.randn(T, kk, k, generator=g, device=device).to(torch.float16)
            ref = mul_mm_id_ref(x, w, topk, round_f16=True)
            for width in widths:
                out = torch.full((T, kk, n), float("nan"), device=device)
                op(x, w, topk, tile=width, out=out)
                err = row_rel_err(out, ref).cpu()
                bad = (err > bound).nonzero().flatten()
                out_rows.append(
                    AuditRow(
                        scenario,
                        width,
                        r,
                        int(bad.numel()),
                        int(bad[0]) if bad.numel() else None,
                        float(err.max()) if err.numel() else 0.0,
                    )
                )
                if progress:
                    progress(1)
    return out_rows


def _routing(scenario: str, r: int, experts: int, g, device) -> torch.Tensor:
    """int32 topk ids. one-expert: R tokens with k=1, all on expert 1 (expert 0 and the rest
    get nothing). random: R pairs as R/2 tokens x 2 distinct experts (R odd: k=1)."""
    if scenario == "one-expert":
        return torch.ones((r, 1), dtype=torch.int32, device=device)
    if r % 2:
        return torch.randint(0, experts, (r, 1), generator=g, device=device, dtype=torch.int32)
    scores = torch.rand((r // 2, experts), generator=g, device=device)
    return scores.topk(2, dim=1).indices.to(torch.int32)


def row_rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float64 [rows]: ||out_r - ref_r|| / ||ref_r|| per row (last dim); NaN counts as inf."""
    o = out.double().reshape(-1, out.shape[-1])
    f = ref.double().reshape(-1, ref.shape[-1])
    err = (o - f).norm(dim=1) / f.norm(dim=1).clamp_min(1e-30)
    return torch.nan_to_num(err, nan=float("inf"))


def all_rows(widths) -> list[int]:
    """The boundary row counts 1, w-1, w, w+1, 2w+1 of every width, sorted."""
    out = {1}
    for w in widths:
        out |= {w - 1, w, w + 1, 2 * w + 1}
    return sorted(x for x in out if x > 0)
