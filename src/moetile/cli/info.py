"""`moetile info`: versions, device, quant types and a quick self-check of the formats."""

from __future__ import annotations

import platform

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, device, quant types, format self-check")
    p.set_defaults(func=run)


def run(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import numpy as np
    import triton
    from gguf.quants import dequantize as gguf_dequantize
    from rich.console import Console
    from rich.table import Table

    from .. import __version__
    from ..quant import FORMATS, dequantize, random_blocks

    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "?"
    con = Console()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU only)"
    con.print(f"moetile {__version__} | python {platform.python_version()} | torch {torch.__version__} | "
              f"triton {triton.__version__} | gguf {gguf_version} | numpy {np.__version__}")
    con.print(f"GPU: {dev}")
    t = Table(title="quant types (self-check: moetile dequantize == gguf.quants.dequantize, bitwise)")
    for col in ("type", "ggml id", "weights/block", "bytes/block", "bits/weight", "self-check"):
        t.add_column(col)
    ok_all = True
    g = torch.Generator().manual_seed(0)
    for name, fmt in FORMATS.items():
        qt = random_blocks(name, (4, 256), generator=g)
        ours = dequantize(qt).numpy().reshape(-1)
        theirs = gguf_dequantize(qt.data.numpy(), fmt.ggml_type).reshape(-1)
        ok = bool(np.array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32)))
        ok_all &= ok
        t.add_row(name, str(int(fmt.ggml_type)), str(fmt.block_elems), str(fmt.block_bytes),
                  f"{8 * fmt.block_bytes / fmt.block_elems:.4g}", "[green]ok[/]" if ok else "[red]MISMATCH[/]")
    con.print(t)
    return 0 if ok_all else 1
