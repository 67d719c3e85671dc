"""``mul_mm_id``: grouped matmul of GGUF-quantized experts over routed (token, slot) pairs.

Letters: T tokens, k slots per token, P = T*k pairs (p = t*k + s), E experts, N output rows,
K inputs.
"""

from __future__ import annotations

import torch
import triton

from .. import schedule
from ..kernels.dequant import IQ2_XXS, Q2_K, Q4_K, Q8_0
from ..kernels.mm_id import mul_mm_id_kernel
from ..quant import QuantTensor
from ..reference import mul_mm_id_ref
from ._launch import table_for, use_kernel

QTYPE_IDS = {"Q8_0": Q8_0.value, "Q2_K": Q2_K.value, "Q4_K": Q4_K.value, "IQ2_XXS": IQ2_XXS.value}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KSTEP = 256  # the kernels consume K in super-blocks of 256 weights


def mul_mm_id(
    rhs: torch.Tensor,
    w: QuantTensor,
    topk_ids: torch.Tensor,
    *,
    tile="auto",
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """out[t, s, :] = dequant(w[topk_ids[t, s]]) @ rhs_row(t, s), float32 [T, k, N].

    rhs: [T, K] (one row per token, as gate/up read x) or [T, k, K] (one row per pair, as down
    reads mid), float32/float16/bfloat16; operands are rounded to f16 in-kernel, accumulation is
    float32. w: QuantTensor (E, N, K). topk_ids: int32/int64 [T, k]. tile: "auto", "ds4" or a
    width in schedule.WIDTHS (see schedule.choose_tile). validate: check every id is in [0, E)
    (one host sync); without it, pairs with bad ids get NaN rows and nothing is read for them.
    """
    T, k, E, N, K = _check(rhs, w, topk_ids)
    if out is None:
        out = torch.empty((T, k, N), dtype=torch.float32, device=rhs.device)
    else:
        _check_out(out, (T, k, N), torch.float32, rhs.device)
    if validate and topk_ids.numel():
        bad = (topk_ids < 0) | (topk_ids >= E)
        if bool(bad.any()):
            first = bad.reshape(-1).nonzero()[0].item()
            raise ValueError(
                f"topk_ids holds expert ids outside [0, {E}): first at pair {first} "
                f"(token {first // k}, slot {first % k}) = {topk_ids.reshape(-1)[first].item()}"
            )
    if T == 0:
        return out
    if not use_kernel(rhs.device, "mul_mm_id"):
        out.copy_(mul_mm_id_ref(rhs, w, topk_ids, round_f16=True))
        return out
    emap = schedule.build_expert_map(topk_ids, E)
    width = schedule.choose_tile(tile, T, k, E)
    tiles = schedule.build_tiles(emap, width)
    mul_mm_id_mapped(rhs, w, emap, tiles, out=out.view(T * k, N))
    return out


def mul_mm_id_mapped(
    rhs: torch.Tensor,
    w: QuantTensor,
    emap: schedule.ExpertMap,
    tiles: schedule.TileList,
    *,
    out: torch.Tensor,
    config: schedule.MMConfig | None = None,
    w_up: QuantTensor | None = None,
    route_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Low-level launch over a prebuilt ExpertMap and TileList (reused across gate, up, down).

    rhs [T, K] (per token) or [T, k, K] (per pair); out [P, N] float32 — or, when ``w_up`` is given, the fused gate+up
    SwiGLU variant: out [P, N] float16 mid = silu(min(g, 10)) * clamp(u, -10, 10) * route_w,
    with ``route_weights`` float32 [P]. Inputs are assumed checked by the caller.
    """
    E, N, K = w.shape
    P = emap.num_pairs
    if P == 0:
        return out
    fused = w_up is not None
    cfg = config or schedule.mm_config(tiles.width, N, w.qtype, fused=fused)
    # the ds4 hazard (reference §6.4): the grid must be sized for the width the kernel computes
    if cfg.block_m != tiles.width:
        raise AssertionError(f"kernel token tile {cfg.block_m} != tile list width {tiles.width}")
    per_pair = rhs.dim() == 3  # [T, k, K]: one row per pair; [T, K]: one row per token
    rhs2 = rhs.reshape(-1, K)
    if rhs2.shape[0] != (P if per_pair else emap.num_tokens):
        raise ValueError(f"rhs {tuple(rhs.shape)} does not match {emap.num_tokens} tokens x {emap.top_k} slots")
    table = table_for(w.qtype, w.device)
    dummy = w.data
    if rhs2.dtype != torch.float16:  # operands are f16 in the MMA anyway: halve the re-reads
        rhs2 = rhs2.to(torch.float16)
    grid = (triton.cdiv(N, cfg.block_n), tiles.n_tiles)
    mul_mm_id_kernel[grid](
        w.data,
        w_up.data if fused else dummy,
        table if table is not None else dummy,
        rhs2,
        route_weights if fused else dummy,
        out,
        emap.sorted_pairs,
        emap.offsets,
        tiles.expert,
        tiles.row,
        N,
        K,
        w.row_bytes,
        N * w.row_bytes,
        rhs2.stride(0),
        emap.top_k,
        E,
        QTYPE=QTYPE_IDS[w.qtype],
        RHS_PER_PAIR=per_pair,
        FUSE_SWIGLU=fused,
        CLAMP=10.0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _check(rhs, w, topk_ids):
    if not isinstance(w, QuantTensor):
        raise TypeError(f"w must be a moetile.quant.QuantTensor, got {type(w).__name__}")
    if len(w.shape) != 3:
        raise ValueError(f"w must be an expert stack (E, N, K), got shape {w.shape}")
    E, N, K = w.shape
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be an int32/int64 tensor, got {getattr(topk_ids, 'dtype', type(topk_ids))}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    T, k = topk_ids.shape
    if not isinstance(rhs, torch.Tensor) or rhs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rhs must be a float32/float16/bfloat16 tensor, got {getattr(rhs, 'dtype', type(rhs))}")
    if rhs.dim() == 2:
        if tuple(rhs.shape) != (T, K):
            raise ValueError(
                f"rhs [T, K] must be ({T}, {K}) to match topk_ids {tuple(topk_ids.shape)} and w {w.shape}, "
                f"got {tuple(rhs.shape)}"
            )
    elif rhs.dim() == 3:
        if tuple(rhs.shape) != (T, k, K):
            raise ValueError(
                f"rhs [T, k, K] must be ({T}, {k}, {K}) to match topk_ids {tuple(topk_ids.shape)} and "
                f"w {w.shape}, got {tuple(rhs.shape)}"
            )
    else:
        raise ValueError(f"rhs must be [T, K] or [T, k, K], got shape {tuple(rhs.shape)}")
    if rhs.device != w.device or topk_ids.device != w.device:
        raise ValueError(
            f"rhs ({rhs.device}), w ({w.device}) and topk_ids ({topk_ids.device}) must be on one device"
        )
    if K % KSTEP:
        raise ValueError(f"mul_mm_id needs K to be a multiple of {KSTEP}, got K={K}")
    if not rhs.is_contiguous():
        raise ValueError(f"rhs must be contiguous (strides {rhs.stride()}); call .contiguous() first")
    return T, k, E, N, K


def _check_out(out, shape, dtype, device):
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(
            f"out must be a {dtype} tensor of shape {shape}, got "
            f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}"
        )
    if out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be contiguous on {device}")
