"""Every kernel variant with the PTX decoders on compiles for sm_90 (tools/compile_sm90.py), so a GPU-only
path cannot break unseen in CI: Triton's ptxas checks the inline PTX, every branch's types and the
resources. Runs in a subprocess, since this process's kernels are built for the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_variants_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_sm90.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    failures = [ln for ln in res.stdout.splitlines() if ln.startswith("FAILED")]
    assert res.returncode == 0 and not failures, "\n".join(failures) or res.stderr[-2000:]
