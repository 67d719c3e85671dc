"""IQ2_XXS: 256 weights in 66 bytes (2.06 bits per weight).

Block layout (reference §4.4): ``d`` f16 at bytes 0..1, then eight 8-byte groups of 32
weights. Group g holds two little-endian uint32 words: A (four 8-bit grid indices, one per
8-weight sub-vector) and B (four 7-bit sign indices at bits 0, 7, 14, 21 and a 4-bit scale
s at bits 28..31). A weight is ``d·(0.5+s)·0.25 · GRID[idx][j] · ±1`` with GRID values in
{8, 25, 43}; the sign byte is ``KSIGNS[sign_idx]``, whose bit 7 makes the count of negative
signs in every sub-vector even.

Shapes: B blocks, K weights per row (a multiple of 256); ``[..., K]`` float rows map to
``[..., K // 256 * 66]`` bytes.
"""

from __future__ import annotations

import functools

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import IQ2_XXS as _GGUF_IQ2_XXS

from . import _common as C

QTYPE = "IQ2_XXS"
BLOCK_ELEMS, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS]  # 256, 66
_GROUPS = BLOCK_ELEMS // 32  # 8 groups of 32 weights, one 4-bit scale each
_F16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# tables


@functools.cache
def _grid_cpu() -> torch.Tensor:
    _GGUF_IQ2_XXS.init_grid()
    grid = torch.from_numpy(_GGUF_IQ2_XXS.grid.reshape(256, 8).copy())  # float32 8./25./43.
    return grid.to(torch.uint8)


@functools.cache
def _grid_u8(device: torch.device) -> torch.Tensor:
    return _grid_cpu().to(device)


@functools.cache
def _grid_u64(device: torch.device) -> torch.Tensor:
    g = _grid_cpu().to(torch.int64)  # [256, 8]
    packed = torch.zeros(256, dtype=torch.int64)
    for j in range(8):
        packed |= g[:, j] << (8 * j)  # byte 7 < 0x80, so no sign bit trouble in int64
    return packed.to(device)


@functools.cache
def _ksigns(device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(_GGUF_IQ2_XXS.ksigns), dtype=torch.uint8).to(device)


@functools.cache
def _sign_table(device: torch.device) -> torch.Tensor:
    """float32 [128, 8]: ±1 for bit j of KSIGNS[k] (one gather instead of shifts per weight)."""
    bits = (_ksigns(torch.device("cpu")).to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1
    return (1.0 - 2.0 * bits.float()).to(device)


@functools.cache
def _grid_f32(device: torch.device) -> torch.Tensor:
    return _grid_cpu().float().to(device)


def _dev(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def grid_u8(device=None) -> torch.Tensor:
    """GRID as uint8 [256, 8] (values 8, 25, 43), from ``gguf.quants.IQ2_XXS``. Cached per device."""
    return _grid_u8(_dev(device))


def grid_u64(device=None) -> torch.Tensor:
    """GRID packed as int64 [256]: byte j (little-endian) of entry i is GRID[i][j]."""
    return _grid_u64(_dev(device))


def ksigns(device=None) -> torch.Tensor:
    """KSIGNS as uint8 [128]: ``k | parity(k) << 7``, from ``gguf.quants.IQ2_XXS.ksigns``."""
    return _ksigns(_dev(device))


# ---------------------------------------------------------------------------------------------
# dequantize


def _check_bytes(data: torch.Tensor) -> None:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise TypeError(
            f"iq2_xxs: data must be a uint8 torch.Tensor, got {getattr(data, 'dtype', type(data))}"
        )
    if data.dim() == 0 or data.shape[-1] == 0 or data.shape[-1] % BLOCK_BYTES:
        raise ValueError(
            f"iq2_xxs: data of shape {tuple(data.shape)} must have a last dimension that is a positive "
            f"multiple of {BLOCK_BYTES} bytes"
        )


def dequantize(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., row_bytes] -> float32 [..., K]; bit-identical to ``gguf.quants.dequantize``."""
    _check_bytes(data)
    lead = data.shape[:-1]
    nb = data.shape[-1] // BLOCK_BYTES
    blk = data.contiguous().reshape(-1, BLOCK_BYTES)  # [B, 66]
    d = blk[:, :2].contiguous().view(torch.float16).float()  # [B, 1]
    qs = blk[:, 2:].reshape(-1, _GROUPS, 8)  # [B, 8, 8]: bytes 0..3 = A, 4..7 = B
    idx = qs[..., :4].long()  # [B, 8, 4] grid indices
    bw = qs[..., 4:].to(torch.int64)
    bword = bw[..., 0] | (bw[..., 1] << 8) | (bw[..., 2] << 16) | (bw[..., 3] << 24)  # [B, 8]
    scale = (bword >> 28).float()
    # same float32 operation order as gguf: (d * (0.5 + s)) * 0.25, then (db * grid) * sign
    db = (d * (0.5 + scale)) * 0.25  # [B, 8]
    sidx = (bword[..., None] >> torch.tensor([0, 7, 14, 21], device=data.device)) & 0x7F  # [B, 8, 4]
    dev = _dev(data.device)
    signs = _sign_table(dev)[sidx]  # [B, 8, 4, 8] ±1
    grid = _grid_f32(dev)[idx]  # [B, 8, 4, 8]
    out = (db[..., None, None] * grid) * signs
    return out.reshape(*lead, nb * BLOCK_ELEMS)


# ---------------------------------------------------------------------------------------------
# quantize
#
# Per 8-weight sub-vector with magnitudes a, signs from x and column weights w, the error of
# grid point g at group scale c is  S - 2c·P[g] + c²·Q[g]  with  S = Σ w a²,  P = (w a)·GRID[g],
# Q = w·GRID[g]².  When x has an odd number of negatives one stored sign must disagree with x;
# the cheapest element to flip for grid point g lowers P[g] by 2·min_j w_j a_j GRID[g][j], so
# folding that into P keeps the error exact, and P, Q do not depend on c: trying a scale costs
# one multiply-add and a max over 256 per sub-vector.

# candidate group scales, as multiples of (group max |x|) / 43
_SCALE_FACTORS = (0.6, 0.7, 0.8, 0.9, 1.02)
_D_FACTORS = (1.0, 0.94, 0.88)  # candidate super-scales, as multiples of 8·max(c)/31
_LS_ROUNDS = 2


def _prepare(xb: torch.Tensor, wb: torch.Tensor):
    """xb, wb: [n, 8, 4, 8] -> S [n, 8, 4], P2 = 2·P_eff [n, 8, 4, 256], Q [n, 8, 4, 256], odd."""
    grid = _grid_f32(_dev(xb.device))  # [256, 8]
    a = xb.abs()
    wa = wb * a
    s = (wa * a).sum(-1)
    p2 = wa @ (2.0 * grid).T
    q = wb @ (grid * grid).T
    odd = ((xb < 0).sum(-1) & 1).to(torch.float32)  # [n, 8, 4]: 1 where a flip is forced
    m = wa[..., 0:1] * grid[:, 0]  # min_j w_j a_j GRID[g][j], in place to spare allocations
    tmp = torch.empty_like(m)
    for j in range(1, 8):
        torch.minimum(m, torch.mul(wa[..., j : j + 1], grid[:, j], out=tmp), out=m)
    p2.addcmul_(odd[..., None], m, value=-4.0)
    return s, p2, q, odd.bool()


class _Fitter:
    """Errors and best grid points of one chunk at per-group scales c [n, 8] (c >= 0)."""

    def __init__(self, s, p2, q):
        self.s, self.p2, self.q = s, p2, q
        self.buf = torch.empty_like(p2)  # reused: the [n, 8, 4, 256] temporary dominates the cost

    def _scores(self, c):
        return torch.addcmul(self.p2, self.q, c[..., None, None], value=-1.0, out=self.buf)  # 2P - cQ

    def err(self, c):
        """Group errors [n, 8] at the best grid points."""
        h = self._scores(c).amax(-1)
        return (self.s - c[..., None] * h).sum(-1)

    def fit(self, c):
        """(group errors [n, 8], best grid points [n, 8, 4])."""
        h, idx = self._scores(c).max(-1)
        return (self.s - c[..., None] * h).sum(-1), idx

    def gather(self, idx):
        """2·P_eff and Q at grid points idx, summed over each group's sub-vectors: [n, 8] each.

        For fixed grid points the least-squares group scale is 0.5·p2/q.
        """
        pg = self.p2.gather(-1, idx[..., None])[..., 0].sum(-1)
        qg = self.q.gather(-1, idx[..., None])[..., 0].sum(-1)
        return pg, qg

    def pick_scales(self, d, c_target):
        """For super-scale d [n, 1]: the better of the two 4-bit scales around c_target [n, 8].

        Returns (error [n, 8], scale as float [n, 8]).
        """
        safe = torch.where(d > 0, d, torch.ones_like(d))
        lo = torch.floor(4.0 * c_target / safe - 0.5).clamp(0, 15)
        lo = torch.where(d > 0, lo, torch.zeros_like(lo))
        hi = (lo + 1).clamp_max(15)
        e_lo = self.err((d * (0.5 + lo)) * 0.25)
        e_hi = self.err((d * (0.5 + hi)) * 0.25)
        use_hi = e_hi < e_lo
        return torch.where(use_hi, e_hi, e_lo), torch.where(use_hi, hi, lo)


def _quantize_chunk(xb: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """xb, wb: float32 [n, 8, 4, 8] -> uint8 [n, 66]."""
    s, p2, q, odd = _prepare(xb, wb)
    fitter = _Fitter(s, p2, q)
    amax = xb.abs().amax(dim=(-1, -2))  # [n, 8]

    # 1) per group: best free scale among candidates, then least-squares refits
    best_c = best_e = None
    for f in _SCALE_FACTORS:
        c = amax * (f / 43.0)
        e = fitter.err(c)
        if best_e is None:
            best_c, best_e = c, e
        else:
            better = e < best_e
            best_c = torch.where(better, c, best_c)
            best_e = torch.where(better, e, best_e)
    best_e, best_i = fitter.fit(best_c)
    for _ in range(_LS_ROUNDS):
        pg, qg = fitter.gather(best_i)
        c = torch.where(qg > 0, 0.5 * pg / qg.clamp_min(1e-30), best_c).clamp_min(0)
        e, i = fitter.fit(c)  # no worse than best_e for the same grid points, usually better
        better = e < best_e
        best_c = torch.where(better, c, best_c)
        best_e = torch.where(better, e, best_e)
        best_i = torch.where(better[..., None], i, best_i)

    # 2) per block: f16 super-scale d and 4-bit group scales, c = d·(0.5+s)·0.25
    cmax = best_c.amax(-1, keepdim=True)  # [n, 1]
    blk_e = None
    for t in _D_FACTORS:
        d = (cmax * (t * 8.0 / 31.0)).clamp_max(_F16_MAX).half().float()  # exactly what is stored
        e_d, sc_d = fitter.pick_scales(d, best_c)
        tot = e_d.sum(-1, keepdim=True)
        if blk_e is None:
            blk_e, blk_d, blk_s = tot, d, sc_d
        else:
            better = tot < blk_e
            blk_e = torch.where(better, tot, blk_e)
            blk_d = torch.where(better, d, blk_d)
            blk_s = torch.where(better, sc_d, blk_s)

    # 3) least-squares refit of d for the chosen scales and grid points, kept where it helps
    for _ in range(_LS_ROUNDS):
        k = (0.5 + blk_s) * 0.25  # [n, 8]
        c = blk_d * k
        _, idx = fitter.fit(c)
        pg, qg = fitter.gather(idx)
        num = (k * pg).sum(-1, keepdim=True)
        den = (k * k * qg).sum(-1, keepdim=True)
        d = torch.where(den > 0, 0.5 * num / den.clamp_min(1e-30), blk_d)
        d = d.clamp(0, _F16_MAX).half().float()
        e_d, sc_d = fitter.pick_scales(d, c)
        tot = e_d.sum(-1, keepdim=True)
        better = tot < blk_e
        blk_e = torch.where(better, tot, blk_e)
        blk_d = torch.where(better, d, blk_d)
        blk_s = torch.where(better, sc_d, blk_s)

    # 4) final grid points at the stored scales, sign bits with the parity flip
    _, idx = fitter.fit((blk_d * (0.5 + blk_s)) * 0.25)
    return _pack(xb, wb, blk_d, blk_s, idx, odd)


def _pack(xb, wb, d, sc, idx, odd) -> torch.Tensor:
    """Assemble blocks: d [n, 1] f16-exact, sc [n, 8] float 0..15, idx [n, 8, 4], odd [n, 8, 4]."""
    n = xb.shape[0]
    dev = xb.device
    gsel = _grid_f32(_dev(dev))[idx]  # [n, 8, 4, 8]
    flip = (wb * xb.abs() * gsel).argmin(-1)  # cheapest element to disagree with x's sign
    neg = (xb < 0).to(torch.int64)
    neg = neg ^ (torch.nn.functional.one_hot(flip, 8) * odd[..., None].to(torch.int64))
    bitw = torch.tensor([1 << j for j in range(7)], device=dev, dtype=torch.int64)
    s7 = (neg[..., :7] * bitw).sum(-1)  # [n, 8, 4]: bit 7 is implied by even parity
    bword = (s7 * torch.tensor([1, 1 << 7, 1 << 14, 1 << 21], device=dev, dtype=torch.int64)).sum(-1)
    bword = bword | (sc.to(torch.int64) << 28)  # [n, 8]
    bbytes = (bword[..., None] >> torch.tensor([0, 8, 16, 24], device=dev)) & 0xFF  # [n, 8, 4]
    qs = torch.cat([idx, bbytes], dim=-1).to(torch.uint8).reshape(n, 64)
    dbytes = d.half().view(torch.uint8).reshape(n, 2)
    return torch.cat([dbytes, qs], dim=-1)


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-element weights of the squared error, [..., K]."""
    if importance is None:
        # plain squared error: on N(0,1) rows it gives relative RMSE 0.327, where llama.cpp's
        # x² weighting gives 0.503 and x² + mean(x²) 0.346 with this search
        return torch.ones_like(x)
    return importance.expand_as(x)


def quantize(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [..., K] -> uint8 [..., K // 256 * 66].

    ``importance`` [K] (>= 0) weights each column's squared error; without it the weight of
    every element counts the same. Runs on x's device; blocks are processed in chunks to bound memory.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"iq2_xxs.quantize: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}"
        )
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % BLOCK_ELEMS:
        raise ValueError(
            f"iq2_xxs.quantize: x of shape {tuple(x.shape)} needs a last dimension K that is a positive "
            f"multiple of {BLOCK_ELEMS}"
        )
    k = x.shape[-1]
    if importance is not None:
        if not isinstance(importance, torch.Tensor) or importance.shape != (k,):
            raise ValueError(
                f"iq2_xxs.quantize: importance must be a tensor of shape ({k},), "
                f"got {tuple(getattr(importance, 'shape', ()))}"
            )
        importance = importance.to(device=x.device, dtype=torch.float32)
        if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise ValueError("iq2_xxs.quantize: importance must be finite and >= 0")
    lead = x.shape[:-1]
    C.check_finite(x, QTYPE)
    xf = x.float().contiguous()
    w = _weights(xf, importance)
    xb = xf.reshape(-1, _GROUPS, 4, 8)  # [B, 8, 4, 8]
    wb = w.reshape(-1, _GROUPS, 4, 8)
    nblk = xb.shape[0]
    chunk = 8192 if xb.is_cuda else 512  # P and Q take 64 KiB per block
    out = torch.empty(nblk, BLOCK_BYTES, dtype=torch.uint8, device=x.device)
    for i in range(0, nblk, chunk):
        out[i : i + chunk] = _quantize_chunk(xb[i : i + chunk], wb[i : i + chunk])
        C.check_kept(QTYPE, xb[i : i + chunk].reshape(-1, BLOCK_ELEMS), out[i : i + chunk], dequantize, (0,), i,
                     lead, k // BLOCK_ELEMS)
    return out.reshape(*lead, (k // BLOCK_ELEMS) * BLOCK_BYTES)


# ---------------------------------------------------------------------------------------------
# random blocks


@functools.cache
def _random_d_base() -> float:
    """d giving a weight std of about 0.02 with uniform scales and grid points."""
    g = _grid_cpu().double()
    mean_g2 = (g * g).mean().item()
    s = torch.arange(16, dtype=torch.float64)
    mean_k2 = (((0.5 + s) * 0.25) ** 2).mean().item()
    return 0.02 / (mean_g2 * mean_k2) ** 0.5


def random_blocks(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Valid random blocks for logical ``shape`` (..., K): uint8 [*shape[:-1], K // 256 * 66].

    Every byte pattern of the 64 ``qs`` bytes is valid, so they are uniform random; d is a
    positive f16 around the value that gives weights of std 0.02. Deterministic for a given
    generator; the bytes are drawn on the generator's device (else on ``device``).
    """
    shape = tuple(int(v) for v in shape)
    if len(shape) == 0 or shape[-1] <= 0 or shape[-1] % BLOCK_ELEMS or any(v <= 0 for v in shape):
        raise ValueError(
            f"iq2_xxs.random_blocks: shape {shape} must be positive with a last dimension that is a "
            f"multiple of {BLOCK_ELEMS}"
        )
    out_dev = (
        torch.device(device)
        if device is not None
        else (generator.device if generator is not None else torch.device("cpu"))
    )
    gen_dev = generator.device if generator is not None else out_dev
    nblk = 1
    for v in shape[:-1]:
        nblk *= v
    nblk *= shape[-1] // BLOCK_ELEMS
    qs = torch.randint(
        0, 256, (nblk, BLOCK_BYTES - 2), generator=generator, device=gen_dev, dtype=torch.uint8
    )
    jitter = torch.rand((nblk, 1), generator=generator, device=gen_dev)
    d = (_random_d_base() * (0.75 + 0.5 * jitter)).half()  # positive, normal f16
    blocks = torch.cat([d.view(torch.uint8), qs], dim=-1)
    return blocks.to(out_dev).reshape(*shape[:-1], (shape[-1] // BLOCK_ELEMS) * BLOCK_BYTES)
