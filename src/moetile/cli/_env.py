"""Set TRITON_INTERPRET before moetile's kernels are imported when there is no GPU."""

from __future__ import annotations

import os


def prepare() -> bool:
    """Returns True when kernels will run through Triton's interpreter (no CUDA device)."""
    import torch

    if torch.cuda.is_available():
        return False
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ["TRITON_INTERPRET"] == "1"
