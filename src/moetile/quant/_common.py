"""Shared helpers of the block-format modules: argument checks, f16 fields, and the
vectorized scale/min search used by the K-quants (Q4_K, Q2_K).

Everything here is plain torch and runs on whatever device its inputs live on.
"""

from __future__ import annotations

import torch

F16_MAX = 65504.0
# relative error at which a block counts as lost (1.0: it became zeros); the formats' worst on
# representable data is far below (Q8_0 0.02, Q4_K 0.11, Q2_K 0.33, IQ2_XXS 0.72 on a one-hot block)
LOST = 0.95

# Blocks per chunk when quantizing: small on CPU (the temporaries stay in cache), large on
# GPUs (fewer kernel launches); the search keeps about a dozen [chunk, block_elems] f32 temporaries.
_CHUNK_BLOCKS = {"cpu": 2048, "cuda": 1 << 16}


# --------------------------------------------------------------------------- argument checks


def check_blocks(data: torch.Tensor, name: str, block_bytes: int) -> None:
    """Raise unless ``data`` is uint8 [..., n_blocks * block_bytes] (at least 1-D, non-empty rows)."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{name}.dequantize: data must be a torch.Tensor, got {type(data).__name__}")
    if data.dtype != torch.uint8:
        raise TypeError(f"{name}.dequantize: data must be uint8 raw blocks, got dtype {data.dtype}")
    if data.dim() == 0 or data.shape[-1] == 0 or data.shape[-1] % block_bytes:
        raise ValueError(
            f"{name}.dequantize: data of shape {tuple(data.shape)} must have a last dimension that is a "
            f"positive multiple of the {name} block size of {block_bytes} bytes"
        )


def check_values(x: torch.Tensor, importance: torch.Tensor | None, name: str, block_elems: int) -> None:
    """Raise unless ``x`` is float32 [..., K] with K a positive multiple of ``block_elems``, finite,
    and ``importance`` is None or finite non-negative float [K] on any device."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(
            f"{name}.quantize: x must be a float32 torch.Tensor, got {getattr(x, 'dtype', type(x))}"
        )
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % block_elems:
        raise ValueError(
            f"{name}.quantize: x of shape {tuple(x.shape)} must have a last dimension K that is a positive "
            f"multiple of the {name} block size {block_elems}"
        )
    check_finite(x, name)
    if importance is not None:
        if not isinstance(importance, torch.Tensor) or not importance.is_floating_point():
            raise TypeError(f"{name}.quantize: importance must be a float torch.Tensor or None")
        if tuple(importance.shape) != (x.shape[-1],):
            raise ValueError(
                f"{name}.quantize: importance must have shape ({x.shape[-1]},), got {tuple(importance.shape)}"
            )
        if not bool((torch.isfinite(importance) & (importance >= 0)).all()):
            raise ValueError(f"{name}.quantize: importance must be finite and non-negative")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise naming the first NaN/Inf of ``x`` [..., K] (its row and column)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}.quantize: x{list(at)} = {x[at].item()} is not finite ({int(bad.sum())} such values)")


def check_kept(
    name: str, xb: torch.Tensor, qb: torch.Tensor, dequantize, scale_at: tuple[int, ...], first: int, lead, per_row: int
) -> None:
    """Raise naming the first block the format lost: xb float32 [B, be] quantized to qb uint8
    [B, bb] has an f16 scale (at byte offsets ``scale_at``) saturated at 65504, or dequantizes to
    non-finite values or with relative error >= LOST (a scale below f16's subnormals). ``first`` is
    xb's first block index overall; rows have ``per_row`` blocks, row index over ``lead``."""
    x64 = xb.double()
    y = dequantize(qb).reshape(xb.shape).double()
    norm = x64.norm(dim=1)
    scales = torch.stack([f16_from_bytes(qb[:, o : o + 2].contiguous()) for o in scale_at], dim=1)
    bad = (scales.abs() >= F16_MAX).any(dim=1) | ~torch.isfinite(scales).all(dim=1) | ~torch.isfinite(y).all(dim=1)
    bad |= ((y - x64).norm(dim=1) >= LOST * norm) & (norm > 0)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    row, blk = divmod(first + i, per_row)
    idx = list(torch.unravel_index(torch.tensor(row), tuple(lead))) if len(lead) else []
    be = xb.shape[1]
    amax = x64[i].abs().max().item()
    raise ValueError(
        f"{name}.quantize: row {[int(v) for v in idx]} columns {blk * be}..{(blk + 1) * be - 1}: values up to "
        f"|x| = {amax:.3g} are outside what {name}'s f16 block scale can represent (the block would come "
        f"back {'saturated' if bool((scales[i].abs() >= F16_MAX).any()) else 'as noise or zeros'}); "
        f"rescale the tensor ({int(bad.sum())} such blocks in this chunk)"
    )


def resolve_device(generator: torch.Generator | None, device) -> torch.device:
    """The device to draw on: ``device`` if given, else the generator's, else CPU."""
    if device is not None:
        return torch.device(device)
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def column_weights(importance: torch.Tensor | None, k: int, device: torch.device) -> torch.Tensor:
    """Per-column error weights float32 [K]: ``importance`` with a small floor so that no block
    is left with all-zero weights (that would make the least-squares fits singular)."""
    if importance is None:
        return torch.ones(k, dtype=torch.float32, device=device)
    w = importance.to(device=device, dtype=torch.float32)
    mean = w.mean()
    floor = torch.where(mean > 0, mean * 1e-4, torch.ones_like(mean))
    return w + floor


def chunk_rows(n_rows: int, blocks_per_row: int, device: torch.device) -> int:
    """How many rows to quantize at once."""
    per = _CHUNK_BLOCKS.get(device.type, _CHUNK_BLOCKS["cuda"])
    return max(1, per // blocks_per_row)


# --------------------------------------------------------------------------- f16 fields


def f16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """float32 [...] from little-endian f16 bytes uint8 [..., 2] (exact conversion)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def f16_to_bytes(v: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian f16 bytes of float32 [...] (round to nearest even)."""
    return v.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def to_f16(v: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to f16 and back, clamped to the finite f16 range first."""
    return v.clamp(-F16_MAX, F16_MAX).half().float()


def to_f16_up(v: torch.Tensor) -> torch.Tensor:
    """float32 v ≥ 0 rounded up to an f16 value (≤ F16_MAX) and back.

    Rounding a super-scale up keeps the integer sub-scales it divides within their range,
    which matters where f16 is coarse (subnormal super-scales of tiny weights).
    """
    h = v.clamp(0, F16_MAX).half()
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where((h.float() < v) & (h < F16_MAX), up, h).float()


# --------------------------------------------------------------------------- scale/min search


def _wsum(a: torch.Tensor) -> torch.Tensor:
    return a.sum(-1, keepdim=True)


def fit_scale_min(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, refine: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best affine grid per sub-block: ``x ≈ scale·L − mn`` with integer L in [0, nmax],
    ``scale ≥ 0`` and ``mn ≥ 0`` (the offset only ever shifts down, as the K-quant formats store it).

    x, w: float32 [..., S] (values, error weights ≥ 0). Returns scale, mn: float32 [..., 1].

    Candidate inverse scales (nmax + rmin + rdelta·i) / (max − min), i = 0..nstep, each
    quantize the sub-block from its minimum; for each the weighted least-squares (scale, mn) of
    those levels is solved in closed form and the lowest weighted squared error wins. A few
    Lloyd steps (re-round with the winner, re-solve) follow.
    """
    xmin = x.amin(-1, keepdim=True).clamp(max=0)  # [..., 1]
    xmax = x.amax(-1, keepdim=True)
    rng = xmax - xmin
    flat = rng <= 0  # constant sub-block: only the offset matters
    rng = torch.where(flat, torch.ones_like(rng), rng)
    sw = _wsum(w)
    wx = w * x
    sx = _wsum(wx)
    sx2 = _wsum(wx * x)

    # start: the plain min/max grid
    scale = torch.where(flat, torch.zeros_like(rng), rng / nmax)
    off = xmin
    err = _error(x, w, scale, off, nmax)

    def solve(L):
        wl = w * L
        sl = _wsum(wl)
        sl2 = _wsum(wl * L)
        sxl = _wsum(wl * x)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * sxl - sx * sl) / det
        o = (sl2 * sx - sl * sxl) / det
        # a positive offset cannot be stored: refit the scale alone with offset 0
        pos = o > 0
        s = torch.where(pos, sxl / sl2.clamp_min(1e-30), s)
        o = torch.where(pos, torch.zeros_like(o), o)
        ok = ok & (s > 0)
        # weighted squared error Σw(s·L + o − x)², expanded so no [..., S] pass is needed
        e = sx2 + s * s * sl2 + o * o * sw + 2 * (s * o * sl - s * sxl - o * sx)
        e = torch.where(ok, e, torch.full_like(e, float("inf")))
        return s, o, e

    for i in range(nstep + 1):
        iscale = (nmax + rmin + rdelta * i) / rng
        L = ((x - xmin) * iscale).round_().clamp_(0, nmax)
        s, o, e = solve(L)
        better = e < err
        scale = torch.where(better, s, scale)
        off = torch.where(better, o, off)
        err = torch.where(better, e, err)

    for _ in range(refine):
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        L = ((x - off) * inv).round_().clamp_(0, nmax)
        s, o, e = solve(L)
        better = e < err
        scale = torch.where(better, s, scale)
        off = torch.where(better, o, off)
        err = torch.where(better, e, err)

    return scale, -off


def _error(x, w, scale, off, nmax):
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    L = ((x - off) * inv).round().clamp(0, nmax)
    return _wsum(w * (scale * L + off - x) ** 2)


# --------------------------------------------------------------------------- K-quant super-blocks


def quantize_levels(x, dl, ml, nmax):
    """Integer levels float32 [..., S] for x ≈ dl·L − ml with dl, ml: [..., 1] (L = 0 where dl = 0)."""
    inv = torch.where(dl > 0, 1 / dl, torch.zeros_like(dl))
    return ((x + ml) * inv).round_().clamp_(0, nmax)


def fit_superblock(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    mn: torch.Tensor,
    nmax: int,
    sc_max: int,
    m_max: int,
    rounds: int = 2,
):
    """Quantize sub-block (scale, mn) pairs against one f16 (d, dmin) per super-block.

    x, w: float32 [B, J, S] (J sub-blocks of S values); scale, mn: float32 [B, J, 1] from
    :func:`fit_scale_min`. The stored form is ``x ≈ (d·sc)·L − dmin·m`` with integer
    sc ∈ [0, sc_max], m ∈ [0, m_max], L ∈ [0, nmax].

    Returns d, dmin: float32 [B] (exactly representable in f16), sc, m: float32 [B, J] and
    L: float32 [B, J, S].
    """
    d = to_f16_up(scale.amax(dim=(1, 2)) / sc_max)  # [B]
    dmin = to_f16_up(mn.amax(dim=(1, 2)) / m_max)
    best = None
    for r in range(rounds):
        if r:  # later rounds start from the least-squares (d, dmin) of the best levels so far
            d, dmin = _refit_super(x, w, *best[2:5])
        sc, m, L, err = _pick_subscales(x, w, scale, mn, d, dmin, nmax, sc_max, m_max)
        cand = (d, dmin, sc, m, L, err.sum((1, 2)))
        best = cand if best is None else _keep_better(best, cand)
    return best[0], best[1], best[2].squeeze(-1), best[3].squeeze(-1), best[4]


def _keep_better(a, b):
    better = b[5] < a[5]  # [B]
    out = []
    for ta, tb in zip(a, b, strict=True):
        mask = better.reshape(better.shape + (1,) * (ta.dim() - 1))
        out.append(torch.where(mask, tb, ta))
    return tuple(out)


def _pick_subscales(x, w, scale, mn, d, dmin, nmax, sc_max, m_max):
    """Integer (sc, m) per sub-block, trying the 3x3 neighbourhood of the rounded targets,
    each scored by the weighted error of the exact dequantization arithmetic."""
    d3 = d.view(-1, 1, 1)
    dmin3 = dmin.view(-1, 1, 1)
    sc0 = torch.where(d3 > 0, scale / torch.where(d3 > 0, d3, 1), torch.zeros_like(scale)).round()
    m0 = torch.where(dmin3 > 0, mn / torch.where(dmin3 > 0, dmin3, 1), torch.zeros_like(mn)).round()
    best_err = best_sc = best_m = best_L = None
    for dsc in (0, -1, 1):
        sc = (sc0 + dsc).clamp(0, sc_max)
        dl = d3 * sc  # [B, J, 1], the same f32 product the dequantizer forms
        for dm in (0, -1, 1):
            m = (m0 + dm).clamp(0, m_max)
            ml = dmin3 * m
            L = quantize_levels(x, dl, ml, nmax)
            err = _wsum(w * (dl * L - ml - x) ** 2)
            if best_err is None:
                best_err, best_sc, best_m, best_L = err, sc, m, L
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_sc = torch.where(better, sc, best_sc)
            best_m = torch.where(better, m, best_m)
            best_L = torch.where(better, L, best_L)
    return best_sc, best_m, best_L, best_err


def _refit_super(x, w, sc, m, L):
    """Weighted least squares for (d, dmin) of each super-block with sc, m, L fixed, then f16."""
    a = sc * L  # [B, J, S]: x ≈ d·a − dmin·m
    b = m.expand_as(a)
    dims = (1, 2)
    saa = (w * a * a).sum(dims)
    sbb = (w * b * b).sum(dims)
    sab = (w * a * b).sum(dims)
    sxa = (w * x * a).sum(dims)
    sxb = (w * x * b).sum(dims)
    det = saa * sbb - sab * sab
    ok = det > saa * sbb * 1e-6
    det = torch.where(ok, det, torch.ones_like(det))
    d = (sxa * sbb - sxb * sab) / det
    dmin = (sxa * sab - sxb * saa) / det
    # degenerate (no mins in use, or a flat block): fit d alone
    d_only = sxa / saa.clamp_min(1e-30)
    d = torch.where(ok, d, d_only)
    dmin = torch.where(ok, dmin, torch.zeros_like(dmin))
    return to_f16(d.clamp_min(0)), to_f16(dmin.clamp_min(0))


# --------------------------------------------------------------------------- random blocks


def random_bytes(n_blocks: int, block_bytes: int, generator, device) -> torch.Tensor:
    """uint8 [n_blocks, block_bytes] uniformly random (every quant and sub-scale bit pattern)."""
    return torch.randint(
        0, 256, (n_blocks, block_bytes), dtype=torch.uint8, generator=generator, device=device
    )


def random_super_scales(n_blocks: int, base: float, generator, device) -> torch.Tensor:
    """float32 [n_blocks]: ``base`` times a per-block factor uniform in [0.5, 1.5), normalised so
    the mean square of the factor is 1 (then values keep the std that ``base`` was chosen for)."""
    u = torch.rand(n_blocks, dtype=torch.float32, generator=generator, device=device)
    return (u + 0.5) * (base / (13.0 / 12.0) ** 0.5)


def logical_blocks(shape, block_elems: int) -> tuple[tuple[int, ...], int]:
    """(leading dims, blocks per row) of a logical shape (..., K)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or shape[-1] <= 0 or shape[-1] % block_elems or any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} must end in a positive multiple of the block size {block_elems}")
    return shape[:-1], shape[-1] // block_elems


def quantize_rows(x: torch.Tensor, importance: torch.Tensor | None, block_elems: int, block_bytes: int, fn,
                  name: str, dequantize, scale_at: tuple[int, ...]):
    """Drive a per-block quantizer over x float32 [..., K] in row chunks.

    ``fn(xb, wb)`` takes values and error weights float32 [B, block_elems] and returns
    uint8 [B, block_bytes]. Returns uint8 [..., (K // block_elems) * block_bytes]. Each chunk is
    dequantized back (``dequantize``) and a lost block raises (check_kept; f16 scales at ``scale_at``).
    """
    k = x.shape[-1]
    nb = k // block_elems
    rows = x.reshape(-1, k)
    w = column_weights(importance, k, x.device).view(1, nb, block_elems)
    out = torch.empty(rows.shape[0], nb * block_bytes, dtype=torch.uint8, device=x.device)
    step = chunk_rows(rows.shape[0], nb, x.device)
    for r0 in range(0, rows.shape[0], step):
        xb = rows[r0 : r0 + step]
        r = xb.shape[0]
        wb = w.expand(r, nb, block_elems).reshape(r * nb, block_elems)
        xblocks = xb.reshape(r * nb, block_elems)
        qb = fn(xblocks, wb)
        check_kept(name, xblocks, qb, dequantize, scale_at, r0 * nb, x.shape[:-1], nb)
        out[r0 : r0 + r] = qb.view(r, nb * block_bytes)
    return out.reshape(*x.shape[:-1], nb * block_bytes)
