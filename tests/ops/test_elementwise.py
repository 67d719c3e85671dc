"""ops.elementwise: the slot sum, in place and through a row index (expert parallelism's results
arrive grouped by rank)."""

import pytest
import torch

from moetile.ops.elementwise import combine_slots


def test_combine_slots_reads_rows_through_the_index(device):
    g = torch.Generator().manual_seed(0)
    T, k, H = 5, 3, 1100  # H crosses a BLOCK boundary
    y = torch.randn(T, k, H, generator=g).to(device)
    y[1, 0, 7] = -0.0  # a -0 in the first slot must survive a one-slot sum (a sum started from +0 loses it)
    add = torch.randn(T, H, generator=g).to(device)
    direct = combine_slots(y, torch.full((T, H), float("nan"), device=device), add)
    ref = ((y[:, 0].double() + y[:, 1]) + y[:, 2] + add).float()
    assert torch.allclose(direct, ref, rtol=1e-6, atol=1e-6)
    perm = torch.randperm(T * k, generator=g).to(device)  # row j of `moved` holds pair perm[j]
    moved = y.reshape(T * k, H)[perm]
    where = torch.empty_like(perm).index_copy_(0, perm, torch.arange(T * k, device=device))
    out = combine_slots(moved, torch.full((T, H), float("nan"), device=device), add, rows=where.view(T, k))
    assert torch.equal(out, direct)
    one = combine_slots(moved, torch.full((T, H), float("nan"), device=device), rows=where.view(T, k)[:, :1])
    assert torch.equal(one, y[:, 0])  # k = 1 through the index: the slot itself
    assert torch.signbit(one[1, 7]) and one[1, 7] == 0  # ... -0 included
    with pytest.raises(ValueError, match="rows must be"):
        combine_slots(moved, torch.empty(T, H, device=device), rows=where.view(T, k)[:3])
