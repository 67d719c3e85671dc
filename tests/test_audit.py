"""The audit passes on the real kernel and catches a kernel that skips rows 33+ of a tile."""

import torch

from moetile.audit import all_rows, run_audit
from moetile.ops.mul_mm_id import mul_mm_id


def test_audit_clean_on_real_kernel(device):
    res = run_audit("Q4_K", 64, 256, [1, 31, 32, 33, 65], [32, 64], device=device)
    assert res and all(r.ok for r in res)


def test_audit_catches_the_ds4_wide_tile_bug(device):
    """Emulate PR #264: with a 64-wide tile only the first 32 pairs of each tile are computed."""

    def ds4_bug(x, w, ids, *, tile, out):
        mul_mm_id(x, w, ids, tile=tile, out=out)
        if tile > 32:
            flat = out.view(-1, out.shape[-1])
            e = ids.reshape(-1).long()
            for ex in torch.unique(e).tolist():
                rows = (e == ex).nonzero().flatten()
                local = torch.arange(rows.numel(), device=rows.device) % tile
                flat[rows[local >= 32]] = float("nan")  # never written

    res = run_audit("Q2_K", 64, 256, [31, 32, 33, 65], [32, 64], device=device, op=ds4_bug)
    by = {(r.scenario, r.width, r.rows): r for r in res}
    assert by[("one-expert", 32, 33)].ok
    assert by[("one-expert", 64, 32)].ok
    bad = by[("one-expert", 64, 33)]
    assert not bad.ok and bad.bad_rows == 1 and bad.first_bad == 32
    assert by[("one-expert", 64, 65)].bad_rows == 32


def test_all_rows():
    assert all_rows([32, 64]) == [1, 31, 32, 33, 63, 64, 65, 129]
