"""``mul_mm_id``: grouped matmul of GGUF-quantized experts over routed (token, slot) pairs.

Letters: T tokens, k slots per token, P = T*k pairs (p = t*k + s), E experts, N output rows,
K inputs.
"""

from __future__ import annotations

import torch
import triton

from .. import schedule
from ..kernels.mm_id import mul_mm_id_kernel
from ..quant import QuantTensor
from ..quant.pack import PackedTensor, packed
from ..reference import mul_mm_id_ref
from ._checks import check_clamp, check_ids_in_range, check_inputs, check_out
from ._launch import form_id, interpreted, kernel_planes, tables_for, use_kernel


def mul_mm_id(
    rhs: torch.Tensor,
    w: QuantTensor | PackedTensor,
    topk_ids: torch.Tensor,
    *,
    tile="auto",
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """out[t, s, :] = dequant(w[topk_ids[t, s]]) @ rhs_row(t, s), float32 [T, k, N].

    rhs: [T, K] (one row per token, as gate/up read x) or [T, k, K] (one row per pair, as down
    reads mid), float32/float16/bfloat16; operands are rounded to f16 in-kernel, accumulation is
    float32. w: PackedTensor or QuantTensor (E, N, K); a QuantTensor is packed on first use
    (moetile.quant.pack.packed caches it). topk_ids: int32/int64 [T, k]. tile: "auto", "ds4" or a
    width in schedule.WIDTHS (see schedule.choose_tile). validate: check every id is in [0, E)
    (one host sync); without it, pairs with bad ids get NaN rows and nothing is read for them.
    """
    T, k, E, N, K = check_inputs("mul_mm_id", rhs, w, topk_ids)
    w = packed(w)
    out = check_out(out, (T, k, N), rhs.device)
    if validate:
        check_ids_in_range(topk_ids, E)
    if T == 0:
        return out
    schedule.tile_max_from_env()  # a bad MOETILE_TILE_MAX is an error on every path, not only the kernels'
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
    w: PackedTensor,
    emap: schedule.ExpertMap,
    tiles: schedule.TileList,
    *,
    out: torch.Tensor,
    config: schedule.MMConfig | None = None,
    w_up: PackedTensor | None = None,
    route_weights: torch.Tensor | None = None,
    clamp: float = 10.0,
) -> torch.Tensor:
    """Low-level launch over a prebuilt ExpertMap and TileList (reused across gate, up, down).

    rhs [T, K] (per token) or [T, k, K] (per pair); out [P, N] float32 — or, when ``w_up`` is
    given, the fused gate+up SwiGLU variant: out [P, N] float16 mid = silu(min(g, C)) *
    clamp(u, -C, C) * route_w, with ``route_weights`` float32 [P] and C = ``clamp`` (> 0; ds4
    files give it per layer). Expert ids are not checked (the map holds them); shapes, dtypes,
    devices and contiguity are, so no argument can make the kernel touch memory outside its
    tensors.
    """
    w = packed(w)
    E, N, K = w.shape
    P = emap.num_pairs
    fused = w_up is not None
    if emap.num_experts != E or emap.sorted_pairs.numel() != P or emap.offsets.numel() != E + 2:
        raise ValueError(f"expert map ({emap.num_tokens} x {emap.top_k} pairs over {emap.num_experts} experts) "
                         f"does not match w {w.shape}")
    check_out(out, (P, N), w.device, torch.float16 if fused else torch.float32)
    if rhs.device != w.device or not rhs.is_contiguous() or rhs.shape[-1] != K or not rhs.is_floating_point():
        raise ValueError(f"rhs must be a contiguous float tensor [T, K] or [T, k, K] with K = {K} on {w.device}, "
                         f"got {rhs.dtype} {tuple(rhs.shape)} on {rhs.device}")
    if fused:
        w_up = packed(w_up)
        if (w_up.qtype, w_up.form, w_up.shape) != (w.qtype, w.form, w.shape):
            raise ValueError(f"w_up {w_up} must match w {w} in type, form and shape")
        rw = route_weights
        if (not isinstance(rw, torch.Tensor) or rw.dtype != torch.float32 or tuple(rw.shape) != (P,)
                or not rw.is_contiguous() or rw.device != w.device):
            raise ValueError(f"route_weights must be a contiguous float32 [P] = ({P},) tensor on {w.device}")
    if P == 0:
        return out
    cfg = config or schedule.mm_config(tiles.width, N, schedule.form_key(w), fused=fused,
                                       interpreter=interpreted())
    # the ds4 hazard (reference §6.4): the grid must be sized for the width the kernel computes
    if cfg.block_m != tiles.width:
        raise AssertionError(f"kernel token tile {cfg.block_m} != tile list width {tiles.width}")
    if (w.qtype, w.form) == ("IQ2_XXS", "fast") and cfg.block_k % 64:
        raise ValueError(f"K step {cfg.block_k}: IQ2_XXS fast keeps two groups' scales in a byte, so its K step "
                         "is a multiple of 64")
    per_pair = rhs.dim() == 3  # [T, k, K]: one row per pair; [T, K]: one row per token
    rhs2 = rhs.reshape(-1, K)
    if rhs2.shape[0] != (P if per_pair else emap.num_tokens):
        raise ValueError(f"rhs {tuple(rhs.shape)} does not match {emap.num_tokens} tokens x {emap.top_k} slots")
    planes = kernel_planes(w)
    up_planes = kernel_planes(w_up) if fused else planes
    table = tables_for(w, w.device)
    if rhs2.dtype != torch.float16:  # operands are f16 in the MMA anyway: halve the re-reads
        rhs2 = rhs2.to(torch.float16)
    grid = (triton.cdiv(N, cfg.block_n), tiles.n_tiles)
    mul_mm_id_kernel[grid](
        *planes,
        *up_planes,
        table if table is not None else planes[0],
        rhs2,
        route_weights if fused else out,
        out,
        emap.sorted_pairs,
        emap.offsets,
        tiles.expert,
        tiles.row,
        N,
        K,
        rhs2.stride(0),
        emap.top_k,
        E,
        FORM=form_id(w),
        ASM=cfg.asm,
        RHS_PER_PAIR=per_pair,
        FUSE_SWIGLU=fused,
        CLAMP=check_clamp(clamp),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
