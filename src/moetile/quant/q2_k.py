"""Q2_K: 256 weights in 84 bytes (2.625 bits per weight).

Block layout (little-endian): ``scales[16] | qs[64] | d: f16 | dmin: f16``. Sixteen sub-blocks of
16 weights each have a 4-bit scale (low nibble of ``scales[j]``) and a 4-bit min (high nibble);
weight i of the block is ``(d·sc)·q − dmin·m`` with the 2-bit ``q`` at bits ``2·s`` of byte
``qs[32·h + l]`` where ``h = i//128``, ``s = (i%128)//32``, ``l = i%32``.
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _common as C

QTYPE = "Q2_K"
BLOCK_ELEMS, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K]  # 256, 84
_SCALES = (80, 82)  # byte offsets of the f16 scales d, dmin in a block
_SUB = 16  # weights per sub-block
_NSUB = BLOCK_ELEMS // _SUB
_STD_BASE = 0.02 / 13.87  # d that gives values of std 0.02 for uniform random sc, m, q (dmin = 1.5 d)


def _shifts(device) -> torch.Tensor:
    return torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=device).view(1, 1, 4, 1)


def dequantize(data: torch.Tensor) -> torch.Tensor:
    """float32 [..., K] from Q2_K blocks uint8 [..., K/256·84]; bit-identical to gguf's numpy."""
    C.check_blocks(data, QTYPE, BLOCK_BYTES)
    nb = data.shape[-1] // BLOCK_BYTES
    b = data.reshape(-1, BLOCK_BYTES)  # [n, 84]
    scales = b[:, 0:16]
    d = C.f16_from_bytes(b[:, 80:82]).unsqueeze(1)  # [n, 1]
    dmin = C.f16_from_bytes(b[:, 82:84]).unsqueeze(1)
    # gguf forms d·sc and dmin·m in f32 first, then (d·sc)·q − dmin·m: keep that order
    dl = (d * (scales & 0xF).float()).unsqueeze(2)  # [n, 16, 1]
    ml = (dmin * (scales >> 4).float()).unsqueeze(2)
    q = (b[:, 16:80].reshape(-1, 2, 1, 32) >> _shifts(b.device)) & 3  # [n, 2, 4, 32]: (h, s, l)
    q = q.reshape(-1, _NSUB, _SUB).float()
    return (dl * q - ml).reshape(*data.shape[:-1], nb * BLOCK_ELEMS)


def _quantize_blocks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 84] from values and error weights float32 [B, 256]."""
    x = x.view(-1, _NSUB, _SUB)
    w = w.view(-1, _NSUB, _SUB)
    scale, mn = C.fit_scale_min(x, w, nmax=3, rmin=-0.5, rdelta=0.1, nstep=15)
    d, dmin, sc, m, L = C.fit_superblock(x, w, scale, mn, nmax=3, sc_max=15, m_max=15)
    L = L.to(torch.uint8).view(-1, 2, 4, 32)  # (h, s, l)
    qs = (L << _shifts(L.device)).sum(dim=2, dtype=torch.uint8)  # disjoint bits: sum == or
    scales = sc.to(torch.uint8) | (m.to(torch.uint8) << 4)
    return torch.cat([scales, qs.reshape(-1, 64), C.f16_to_bytes(d), C.f16_to_bytes(dmin)], dim=1)


def quantize(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Q2_K blocks uint8 [..., K/256·84] of float32 x [..., K] (K a multiple of 256).

    Minimises the squared error weighted per column by ``importance`` (float [K], ≥ 0) if given,
    else the plain squared error. Runs on x's device.
    """
    C.check_values(x, importance, QTYPE, BLOCK_ELEMS)
    return C.quantize_rows(x, importance, BLOCK_ELEMS, BLOCK_BYTES, _quantize_blocks, QTYPE, dequantize, _SCALES)


def random_blocks(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Valid random Q2_K blocks uint8 [*shape[:-1], K/256·84] for logical shape (..., K).

    Quant bits, 4-bit scales and mins are uniform; d is drawn per block so the values have
    std ≈ 0.02, with dmin = 1.5·d to centre them. Deterministic for a given generator.
    """
    lead, nb = C.logical_blocks(shape, BLOCK_ELEMS)
    device = C.resolve_device(generator, device)
    n = nb
    for s in lead:
        n *= s
    b = C.random_bytes(n, BLOCK_BYTES, generator, device)
    d = C.random_super_scales(n, _STD_BASE, generator, device)
    b[:, 80:82] = C.f16_to_bytes(d)
    b[:, 82:84] = C.f16_to_bytes(d * 1.5)
    return b.reshape(*lead, nb * BLOCK_BYTES)
