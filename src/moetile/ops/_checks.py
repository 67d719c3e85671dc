"""Validation shared by the public ops: one place that decides what a kernel may be handed.

Shape, stride, dtype and device checks always run (a kernel must never read or write outside its
tensors); value checks on expert ids are the ``validate`` flag's (they need a host sync).
Letters: T tokens, k slots, P = T*k pairs, E experts, N output rows, K inputs.
"""

from __future__ import annotations

import torch

from ..quant import QuantTensor
from ..quant.pack import PackedTensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KSTEP = 256  # the kernels consume K in super-blocks of 256 weights


def check_inputs(op: str, rhs, w, topk_ids) -> tuple[int, int, int, int, int]:
    """(T, k, E, N, K) after checking rhs [T, K] or [T, k, K] (float, contiguous), w (E, N, K) and
    topk_ids int32/int64 [T, k], all on one device."""
    if not isinstance(w, (QuantTensor, PackedTensor)):
        raise TypeError(f"{op}: w must be a moetile PackedTensor or QuantTensor, got {type(w).__name__}")
    if len(w.shape) != 3:
        raise ValueError(f"{op}: w must be an expert stack (E, N, K), got shape {w.shape}")
    E, N, K = w.shape
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
        got = getattr(topk_ids, "dtype", type(topk_ids))
        raise TypeError(f"{op}: topk_ids must be an int32/int64 tensor, got {got}")
    if topk_ids.dim() != 2:
        raise ValueError(f"{op}: topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    T, k = topk_ids.shape
    if T and k == 0:
        raise ValueError(f"{op}: topk_ids has k = 0 experts per token")
    if not isinstance(rhs, torch.Tensor) or rhs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: rhs must be a float32/float16/bfloat16 tensor, got {getattr(rhs, 'dtype', type(rhs))}")
    if rhs.dim() == 2:
        if tuple(rhs.shape) != (T, K):
            raise ValueError(
                f"{op}: rhs [T, K] must be ({T}, {K}) to match topk_ids {tuple(topk_ids.shape)} and w {w.shape}, "
                f"got {tuple(rhs.shape)}"
            )
    elif rhs.dim() == 3:
        if tuple(rhs.shape) != (T, k, K):
            raise ValueError(
                f"{op}: rhs [T, k, K] must be ({T}, {k}, {K}) to match topk_ids {tuple(topk_ids.shape)} and "
                f"w {w.shape}, got {tuple(rhs.shape)}"
            )
    else:
        raise ValueError(f"{op}: rhs must be [T, K] or [T, k, K], got shape {tuple(rhs.shape)}")
    if rhs.device != w.device or topk_ids.device != w.device:
        raise ValueError(
            f"{op}: rhs ({rhs.device}), w ({w.device}) and topk_ids ({topk_ids.device}) must be on one device"
        )
    if K % KSTEP:
        raise ValueError(f"{op} needs K to be a multiple of {KSTEP}, got K={K}")
    if not rhs.is_contiguous():
        raise ValueError(f"{op}: rhs must be contiguous (strides {rhs.stride()}); call .contiguous() first")
    return T, k, E, N, K


def check_clamp(clamp) -> float:
    """The SwiGLU clamp C as a float, if it is a finite number > 0 (a constexpr of the kernels)."""
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 < clamp < float("inf"):
        raise ValueError(f"clamp must be a finite number > 0, got {clamp!r}")
    return float(clamp)


def check_out(out, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """``out`` if it is a contiguous ``dtype`` tensor of exactly ``shape`` on ``device`` (a fresh
    one when None); raises otherwise."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"out must be a {dtype} tensor of shape {tuple(shape)}, got "
            f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}"
        )
    if out.device != torch.device(device) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous on {device}, got {out.device} with strides {out.stride()}")
    return out


def check_ids_in_range(topk_ids: torch.Tensor, E: int) -> None:
    """Raise naming the first (token, slot) whose expert id is outside [0, E) (one host sync)."""
    if not topk_ids.numel():
        return
    bad = (topk_ids < 0) | (topk_ids >= E)
    if bool(bad.any()):
        k = topk_ids.shape[1]
        first = bad.reshape(-1).nonzero()[0].item()
        raise ValueError(
            f"topk_ids holds expert ids outside [0, {E}): first at pair {first} "
            f"(token {first // k}, slot {first % k}) = {topk_ids.reshape(-1)[first].item()}"
        )


def ids_int32(topk_ids: torch.Tensor, E: int) -> torch.Tensor:
    """int32 [P] expert ids, no host sync. int32 ids pass as they are (every kernel reads an id
    outside [0, E) as bad: a NaN row, nothing read for it); wider ones have every id outside [0, E)
    mapped to -1 first: an int64 id of 2**32 + e must not wrap to expert e."""
    ids = topk_ids.reshape(-1)
    if ids.dtype == torch.int32:  # no launches: this sits between the router and the experts
        return ids.contiguous()
    ok = (ids >= 0) & (ids < E)
    return torch.where(ok, ids, torch.full_like(ids, -1)).to(torch.int32).contiguous()
