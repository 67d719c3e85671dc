"""Tile lists of the grouped matmul, built on the device in one launch (no host sync, no torch op
chain): tile i of a width class is (expert, first row) of the i-th tile when every expert of the
class is cut into tiles of ``width`` pairs, experts in order.

Letters: E experts (bin E holds invalid ids), P pairs.
"""

import triton
import triton.language as tl


@triton.jit
def tile_list_kernel(
    counts_ptr,  # int32 [E+1]: pairs per expert, bin E = invalid ids
    expert_ptr,  # int32 [n_tiles] out
    row_ptr,  # int32 [n_tiles] out: first row, or INT32_MAX for a surplus tile
    n_bins,  # E + 1
    n_tiles,
    width,
    min_rows,  # the class: experts with min_rows <= count < max_rows
    max_rows,
    BLOCK_E: tl.constexpr,  # >= n_bins
    BLOCK_T: tl.constexpr,
):
    b = tl.arange(0, BLOCK_E)
    c = tl.load(counts_ptr + b, mask=b < n_bins, other=0)
    keep = (b < n_bins - 1) & (c >= min_rows) & (c < max_rows)
    keep |= (b == n_bins - 1) & (min_rows == 0)  # invalid ids belong to the class from 0 rows
    per = tl.where(keep, (c + width - 1) // width, 0)
    cum = tl.cumsum(per, 0)  # inclusive
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    # the bin of tile i: how many bins end at or before it (searchsorted, right side)
    e = tl.sum((cum[None, :] <= i[:, None]).to(tl.int32), axis=1)  # [BLOCK_T]
    first = tl.sum(tl.where(b[None, :] == e[:, None], (cum - per)[None, :], 0), axis=1)  # first tile of bin e
    valid = e < n_bins
    row = tl.where(valid, (i - first) * width, 2147483647)
    ok = i < n_tiles
    tl.store(expert_ptr + i, tl.minimum(e, n_bins - 1), mask=ok)
    tl.store(row_ptr + i, row, mask=ok)
