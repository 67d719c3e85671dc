"""Shared test helpers: relative-error metrics that name the first bad coordinates."""

from __future__ import annotations

import torch

from moetile.audit import row_rel_err  # noqa: F401  (re-exported for the tests)


def assert_rows_close(out: torch.Tensor, ref: torch.Tensor, bound: float, what: str = "") -> None:
    """Every row within ``bound`` relative error; no NaN anywhere. Prints the first bad row."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    nan = torch.isnan(out)
    if nan.any():
        idx = nan.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(nan.sum())} NaN elements (first at {idx}): unwritten output")
    err = row_rel_err(out, ref)
    bad = (err > bound).nonzero().flatten()
    if bad.numel():
        r = bad[0].item()
        o = out.reshape(-1, out.shape[-1])[r, :4].tolist()
        f = ref.reshape(-1, ref.shape[-1])[r, :4].tolist()
        raise AssertionError(
            f"{what}: {bad.numel()} rows over relative error {bound:g}; first row {r}: "
            f"err {err[r].item():.3e}, out[:4] {o}, ref[:4] {f}; max err {err.max().item():.3e}"
        )
