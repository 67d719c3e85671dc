"""Q8_0: 32 weights in 34 bytes (8.5 bits per weight).

Block layout (little-endian): ``d: f16 | qs[32]: int8``; weight i is ``d·qs[i]``.
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _common as C

QTYPE = "Q8_0"
BLOCK_ELEMS, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]  # 32, 34
_SCALES = (0,)  # byte offset of the f16 scale d in a block
_STD_BASE = 0.02 / 73.9  # d that gives values of std 0.02 for uniform int8 quants
# candidate step sizes, as fractions of max|x| / 127; below 1 clips the largest value (or uses -128)
_STEP_FACTORS = (1.0, 127 / 127.5, 127 / 128, 127 / 128.5, 127 / 129, 127 / 126.5)


def dequantize(data: torch.Tensor) -> torch.Tensor:
    """float32 [..., K] from Q8_0 blocks uint8 [..., K/32·34]; bit-identical to gguf's numpy."""
    C.check_blocks(data, QTYPE, BLOCK_BYTES)
    nb = data.shape[-1] // BLOCK_BYTES
    b = data.reshape(-1, BLOCK_BYTES)  # [n, 34]
    d = C.f16_from_bytes(b[:, 0:2]).unsqueeze(1)  # [n, 1]
    q = b[:, 2:].contiguous().view(torch.int8).float()  # [n, 32]
    return (q * d).reshape(*data.shape[:-1], nb * BLOCK_ELEMS)


def _levels(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.where(d > 0, (x / safe).round().clamp(-128, 127), torch.zeros_like(x))


def _quantize_blocks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 34] from values and error weights float32 [B, 32].

    Tries a few f16 step sizes around max|x|/127, then one weighted least-squares refit of the
    step for the winning integers; keeps whichever gives the lowest weighted squared error.
    """
    amax = x.abs().amax(1, keepdim=True)  # [B, 1]
    best_d = best_q = best_err = None
    cands = [C.to_f16_up(amax / 127)] + [C.to_f16(amax * (f / 127)) for f in _STEP_FACTORS]
    for i in range(len(cands) + 1):
        if i < len(cands):
            d = cands[i]
        else:  # least squares for d given the best integers so far
            sqq = (w * best_q * best_q).sum(1, keepdim=True)
            d = C.to_f16((w * x * best_q).sum(1, keepdim=True) / sqq.clamp_min(1e-30))
        q = _levels(x, d)
        err = (w * (q * d - x) ** 2).sum(1, keepdim=True)
        if best_err is None:
            best_d, best_q, best_err = d, q, err
            continue
        better = err < best_err
        best_d = torch.where(better, d, best_d)
        best_q = torch.where(better, q, best_q)
        best_err = torch.where(better, err, best_err)
    qs = best_q.to(torch.int8).view(torch.uint8)
    return torch.cat([C.f16_to_bytes(best_d.squeeze(1)), qs], dim=1)


def quantize(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Q8_0 blocks uint8 [..., K/32·34] of float32 x [..., K] (K a multiple of 32).

    Minimises the squared error weighted per column by ``importance`` (float [K], ≥ 0) if given,
    else the plain squared error. Runs on x's device.
    """
    C.check_values(x, importance, QTYPE, BLOCK_ELEMS)
    return C.quantize_rows(x, importance, BLOCK_ELEMS, BLOCK_BYTES, _quantize_blocks, QTYPE, dequantize, _SCALES)


def random_blocks(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Valid random Q8_0 blocks uint8 [*shape[:-1], K/32·34] for logical shape (..., K).

    Quants are uniform int8; d is drawn per block so the values have std ≈ 0.02.
    Deterministic for a given generator.
    """
    lead, nb = C.logical_blocks(shape, BLOCK_ELEMS)
    device = C.resolve_device(generator, device)
    n = nb
    for s in lead:
        n *= s
    b = C.random_bytes(n, BLOCK_BYTES, generator, device)
    b[:, 0:2] = C.f16_to_bytes(C.random_super_scales(n, _STD_BASE, generator, device))
    return b.reshape(*lead, nb * BLOCK_BYTES)
