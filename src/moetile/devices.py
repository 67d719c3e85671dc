"""Where moetile's tensors may live: a user's ``device`` argument is resolved here, once, with an
error a user can act on (torch's own are a bare AssertionError for CUDA on a CPU-only build and
``Tensor.item()`` failures deep inside for meta tensors)."""

from __future__ import annotations

import torch


def resolve(device) -> torch.device | None:
    """``device`` (None, str, int or torch.device) as a torch.device that can hold data; None stays None.

    Raises RuntimeError when CUDA is asked for and not available, ValueError for meta, a CUDA
    index past the last GPU, or a string that names no device.
    """
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"not a device: {device!r} ({exc})") from None
    if d.type == "meta":
        raise ValueError("device 'meta' holds no data; moetile needs real tensors (cpu or cuda)")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"CUDA requested (device={str(device)!r}) but not available: torch {torch.__version__} sees no "
                "CUDA GPU; use device='cpu' (the kernels then run through Triton's interpreter)"
            )
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {d} requested but there are {torch.cuda.device_count()} CUDA devices")
    return d


def refuse_meta(what: str, t: torch.Tensor) -> None:
    """Raise ValueError if ``t`` is a meta tensor (shape only, no data)."""
    if isinstance(t, torch.Tensor) and t.is_meta:
        raise ValueError(f"{what} is a meta tensor (shape only, no data); moetile needs real tensors")
