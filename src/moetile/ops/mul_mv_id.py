"""``mul_mv_id``: decode-path mat-vec over the selected experts, float32 weights and activations.

Letters: T tokens, k slots, P = T*k pairs, E experts, N output rows, K inputs.
"""

from __future__ import annotations

import torch

from .. import schedule
from ..kernels.mv_id import mul_mv_id_kernel, mv_reduce_kernel
from ..quant import QuantTensor
from ..quant.pack import PackedTensor, packed
from ..reference import mul_mm_id_ref, swiglu_ref
from ._checks import check_clamp, check_ids_in_range, check_inputs, check_out, ids_int32
from ._launch import form_id, interpreted, kernel_planes, tables_for, use_kernel
from .act_quant import QAct, act_layout, quantize_act


def mul_mv_id(
    rhs: torch.Tensor,
    w: QuantTensor | PackedTensor,
    topk_ids: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    w_up: QuantTensor | PackedTensor | None = None,
    route_weights: torch.Tensor | None = None,
    clamp: float = 10.0,
    validate: bool = True,
    activations: str = "f32",
) -> torch.Tensor:
    """out f32 [T, k, N] = W[topk_ids[t, s]] @ rhs_row(t, s), with the exact float32 weights.

    rhs: [T, K] (per token) or [T, k, K] (per pair), float32/float16/bfloat16 (read as float32).
    With ``w_up`` (same type, form and shape as ``w``) and ``route_weights`` f32 [T, k] the fused
    gate+up variant writes mid = silu(min(g, C)) * clamp(u, -C, C) * route_weight, C = ``clamp`` (> 0).
    ``validate`` checks every id is in [0, E) (one host sync); without it a pair with a bad id gets
    a NaN row and nothing is read for it. Shapes, strides, dtypes and devices are always checked.
    ``activations``: "f32" (exact float32 products) or "q8x2" (rhs quantized per 32 inputs to two
    int8 levels, ops.act_quant, and integer products: faster; rhs error <= max|x|/32512 per block).
    """
    T, k, E, N, K = check_inputs("mul_mv_id", rhs, w, topk_ids)
    w = packed(w)
    out = check_out(out, (T, k, N), rhs.device)
    fused = w_up is not None
    if fused:
        if not isinstance(w_up, (QuantTensor, PackedTensor)) or tuple(w_up.shape) != tuple(w.shape):
            raise ValueError(f"mul_mv_id: w_up must be a quantized (E, N, K) = {w.shape} tensor, got {w_up!r}")
        w_up = packed(w_up, w.form if w.qtype == "IQ2_XXS" else "auto")
        if (w_up.qtype, w_up.form) != (w.qtype, w.form):
            raise ValueError(f"mul_mv_id: w_up ({w_up.qtype}/{w_up.form}) must match w ({w.qtype}/{w.form})")
        rw = route_weights
        if not isinstance(rw, torch.Tensor) or tuple(rw.shape) != (T, k) or not rw.is_floating_point():
            raise ValueError(f"mul_mv_id: route_weights must be a float tensor [T, k] = ({T}, {k}) with w_up")
        if rw.device != rhs.device:
            raise ValueError(f"mul_mv_id: route_weights is on {rw.device}, rhs on {rhs.device}")
    elif route_weights is not None:
        raise ValueError("mul_mv_id: route_weights is only used with w_up")
    clamp = check_clamp(clamp)
    if activations not in schedule.MV_ACTS:
        raise ValueError(f"mul_mv_id: activations must be one of {schedule.MV_ACTS}, got {activations!r}")
    if validate:
        check_ids_in_range(topk_ids, E)
    if T == 0:
        return out
    if not use_kernel(rhs.device, "mul_mv_id"):
        y = mul_mm_id_ref(rhs, w, topk_ids)
        if fused:
            y = swiglu_ref(y, mul_mm_id_ref(rhs, w_up, topk_ids), route_weights.double()[:, :, None], clamp)
        return out.copy_(y)
    rw = route_weights.reshape(-1).to(torch.float32).contiguous() if fused else None
    act = quantize_act(rhs, act_layout(w)) if activations == "q8x2" else None
    launch_mv(rhs, w, ids_int32(topk_ids, E), k, out.view(T * k, N), w_up=w_up, route_weights=rw, clamp=clamp,
              act=act)
    return out


def launch_mv(rhs: torch.Tensor, w: PackedTensor, ids: torch.Tensor, top_k: int, out: torch.Tensor, *,
              w_up: PackedTensor | None = None, route_weights: torch.Tensor | None = None,
              clamp: float = 10.0, config: schedule.MVConfig | None = None, split: bool = True,
              act: QAct | None = None) -> torch.Tensor:
    """Launch over checked inputs: rhs [T, K] or [T, k, K] contiguous, ids int32 [P] (bad ids
    already -1), out f32 [P, N] contiguous, route_weights f32 [P] and SwiGLU ``clamp`` when fused. ``config``
    overrides schedule.mv_config (A/B runs); ``split=False`` never cuts K (deterministic plans).
    ``act``: rhs quantized by ops.act_quant.quantize_act in the layout of w's form (its rows: rhs's):
    the integer products instead of float32."""
    E, N, K = w.shape
    P = ids.numel()
    if P == 0:
        return out
    per_pair = rhs.dim() == 3
    rhs2 = rhs.reshape(-1, K)
    fused = w_up is not None
    if fused and (w_up.qtype, w_up.form) != (w.qtype, w.form):  # one decoder reads both
        raise ValueError(f"launch_mv: up is {w_up.qtype}/{w_up.form} but gate is {w.qtype}/{w.form}")
    if act is not None and (act.layout != act_layout(w) or act.rows != rhs2.shape[0]
                            or act.words.shape[1] * 32 != K):
        raise ValueError(f"launch_mv: activations of layout {act.layout}, {act.rows} rows do not fit "
                         f"{w.qtype}/{w.form} and rhs {tuple(rhs.shape)}")
    planes = _planes(w, act)
    table = tables_for(w, w.device)
    cfg = config or schedule.mv_config(interpreted(), "f32" if act is None else "q8x2", fused=fused)
    if cfg.asm and cfg.block_n < 16:
        raise ValueError(f"mat-vec with PTX decoders needs block_n >= 16 (8 computed wrong values), got {cfg}")
    if cfg.block_k % 32 or K % cfg.block_k or (act is None and cfg.block_k > 256 and w.qtype != "Q8_0"):
        raise ValueError(f"mat-vec K step {cfg.block_k} must be a multiple of 32 dividing K = {K}, and with "
                         f"float32 activations at most 256 (one scale block) for {w.qtype}")
    if (w.qtype, w.form) == ("IQ2_XXS", "fast") and cfg.block_k % 64:
        raise ValueError(f"mat-vec K step {cfg.block_k}: IQ2_XXS fast keeps two groups' scales in a byte, "
                         "so its K step is a multiple of 64")
    split = schedule.mv_split(N, P, K, cfg, allowed=split)
    grid = (-(-N // cfg.block_n), P, split)
    part = part2 = out
    if split > 1:
        part = torch.empty((split, P, N), dtype=torch.float32, device=out.device)
        part2 = torch.empty_like(part) if fused else part
    mul_mv_id_kernel[grid](
        *planes,
        *(_planes(w_up, act) if fused else planes),
        table if table is not None else planes[0],
        rhs2,
        ids,
        route_weights if fused else out,
        out,
        part,
        part2,
        *((act.words, act.scales, act.sums) if act is not None else (out, out, out)),
        N,
        K,
        -(-K // split),
        rhs2.stride(0),
        top_k,
        E,
        FORM=form_id(w),
        ASM=cfg.asm,
        RHS_PER_PAIR=per_pair,
        FUSE_SWIGLU=fused,
        CLAMP=float(clamp),
        SPLIT=split > 1,
        QACT=act is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )
    if split > 1:
        block = 1024
        mv_reduce_kernel[(P, -(-N // block))](part, part2, route_weights if fused else out, out, P, N, split,
                                              FUSE_SWIGLU=fused, CLAMP=float(clamp), BLOCK=block)
    return out


def _planes(w: PackedTensor, act: QAct | None) -> tuple[torch.Tensor, ...]:
    """kernel_planes(w); the integer decoder reads Q2_K's codes as int32 words of 16."""
    planes = kernel_planes(w)
    if act is not None and w.qtype == "Q2_K":
        planes = (planes[0].view(torch.int32),) + planes[1:]
    return planes
