"""Q4_K: 256 weights in 144 bytes (4.5 bits per weight).

Block layout (little-endian): ``d: f16 | dmin: f16 | scales[12] | qs[128]``. Eight sub-blocks of
32 weights each have a 6-bit scale ``sc`` and a 6-bit min ``m`` packed into ``scales``; weight i
of the block is ``(d·sc)·q − dmin·m`` with the 4-bit ``q`` of byte ``qs[32·(i//64) + i%32]``
(low nibble for the first 32 of each 64, high nibble for the next 32).
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _common as C

QTYPE = "Q4_K"
BLOCK_ELEMS, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]  # 256, 144
_SCALES = (0, 2)  # byte offsets of the f16 scales d, dmin in a block
_SUB = 32  # weights per sub-block
_NSUB = BLOCK_ELEMS // _SUB
_STD_BASE = 0.02 / 258.3  # d that gives values of std 0.02 for uniform random sc, m, q (dmin = 7.5 d)


def _unpack_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """6-bit (sc, m) uint8 [n, 8] each from the packed uint8 [n, 12]."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, m


def _pack_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Packed uint8 [n, 12] from 6-bit sc, m uint8 [n, 8]."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def dequantize(data: torch.Tensor) -> torch.Tensor:
    """float32 [..., K] from Q4_K blocks uint8 [..., K/256·144]; bit-identical to gguf's numpy."""
    C.check_blocks(data, QTYPE, BLOCK_BYTES)
    nb = data.shape[-1] // BLOCK_BYTES
    b = data.reshape(-1, BLOCK_BYTES)  # [n, 144]
    d = C.f16_from_bytes(b[:, 0:2]).unsqueeze(1)  # [n, 1]
    dmin = C.f16_from_bytes(b[:, 2:4]).unsqueeze(1)
    sc, m = _unpack_scales(b[:, 4:16])
    # gguf forms d·sc and dmin·m in f32 first, then (d·sc)·q − dmin·m: keep that order
    dl = (d * sc.float()).unsqueeze(2)  # [n, 8, 1]
    ml = (dmin * m.float()).unsqueeze(2)
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, _NSUB, _SUB).float()  # [n, 8, 32]
    return (dl * q - ml).reshape(*data.shape[:-1], nb * BLOCK_ELEMS)


def _quantize_blocks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 144] from values and error weights float32 [B, 256]."""
    x = x.view(-1, _NSUB, _SUB)
    w = w.view(-1, _NSUB, _SUB)
    scale, mn = C.fit_scale_min(x, w, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    d, dmin, sc, m, L = C.fit_superblock(x, w, scale, mn, nmax=15, sc_max=63, m_max=63)
    L = L.to(torch.uint8)  # [B, 8, 32]
    qs = L[:, 0::2] | (L[:, 1::2] << 4)  # [B, 4, 32]
    scales = _pack_scales(sc.to(torch.uint8), m.to(torch.uint8))
    return torch.cat([C.f16_to_bytes(d), C.f16_to_bytes(dmin), scales, qs.reshape(-1, 128)], dim=1)


def quantize(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_K blocks uint8 [..., K/256·144] of float32 x [..., K] (K a multiple of 256).

    Minimises the squared error weighted per column by ``importance`` (float [K], ≥ 0) if given,
    else the plain squared error. Runs on x's device.
    """
    C.check_values(x, importance, QTYPE, BLOCK_ELEMS)
    return C.quantize_rows(x, importance, BLOCK_ELEMS, BLOCK_BYTES, _quantize_blocks, QTYPE, dequantize, _SCALES)


def random_blocks(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Valid random Q4_K blocks uint8 [*shape[:-1], K/256·144] for logical shape (..., K).

    Quant bits, 6-bit scales and mins are uniform; d is drawn per block so the values have
    std ≈ 0.02, with dmin = 7.5·d to centre them. Deterministic for a given generator.
    """
    lead, nb = C.logical_blocks(shape, BLOCK_ELEMS)
    device = C.resolve_device(generator, device)
    n = nb
    for s in lead:
        n *= s
    b = C.random_bytes(n, BLOCK_BYTES, generator, device)
    d = C.random_super_scales(n, _STD_BASE, generator, device)
    b[:, 0:2] = C.f16_to_bytes(d)
    b[:, 2:4] = C.f16_to_bytes(d * 7.5)
    return b.reshape(*lead, nb * BLOCK_BYTES)
