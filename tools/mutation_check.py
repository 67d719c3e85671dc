"""Mutation check: plant kernel bugs in a copy of the project and assert the CPU test suite catches
each one (the tests run the real Triton kernels through the interpreter).

    python3 tools/mutation_check.py            # or: make mutation

Each mutant is a one-line change to a kernel; a mutant the selected tests do not fail on is a
hole in the tests. Exits 1 if any mutant survives. Takes a few minutes on two cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/ops/test_mul_mm_id.py", "tests/kernels", "tests/test_golden.py", "tests/test_moe.py"]
# (name, file, text, replacement)
MUTANTS = [
    ("tile stores only its first 32 rows (ds4 PR #264)", "src/moetile/kernels/mm_id.py",
     "    out_mask = n_ok[:, None] & m_ok[None, :]\n",
     "    out_mask = n_ok[:, None] & m_ok[None, :] & (tl.arange(0, BLOCK_M) < 32)[None, :]\n"),
    ("codes of every K step read from the first step", "src/moetile/kernels/decode.py",
     "c = tl.load(p0 + rr * (K // 8) + (k0 // 8 + 4 * g)",
     "c = tl.load(p0 + rr * (K // 8) + (0 // 8 + 4 * g)"),
    ("scales of the first K step reused for every step", "src/moetile/kernels/mm_id.py",
     "        a, b = na, nb\n", "\n"),
    ("the last weight row of a program block dropped", "src/moetile/kernels/mm_id.py",
     "    n_ok = n < N\n", "    n_ok = n < N - 1\n"),
    ("q8x2: the low int8 level of the activations dropped", "src/moetile/kernels/act_quant.py",
     "q = tl.where(lev[None, :, :] == 0, qh, ql)", "q = tl.where(lev[None, :, :] == 0, qh, 0.0 * ql)"),
    ("q8x2: the second 16 inputs' sum taken from the first", "src/moetile/kernels/act_quant.py",
     "tl.sum(tl.where(first, 0, a), axis=1)", "tl.sum(tl.where(first, a, 0), axis=1)"),
]


def _run(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                          cwd=tree, env=env, capture_output=True, text=True)


def main() -> int:
    survivors = 0
    for name, rel, old, new in MUTANTS:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "moetile"
            shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "out", "__pycache__",
                                                                      ".baseline", ".v1", ".whl"))
            path = tree / rel
            text = path.read_text()
            if text.count(old) < 1:
                print(f"[stale] {name}: pattern not found in {rel}")
                survivors += 1
                continue
            path.write_text(text.replace(old, new))
            res = _run(tree)
            failed = [ln for ln in res.stdout.splitlines() if ln.startswith("FAILED")]
            if res.returncode == 0:
                print(f"[SURVIVED] {name}")
                survivors += 1
            else:
                print(f"[caught] {name}: {failed[0] if failed else res.stdout.strip().splitlines()[-1]}")
    print("mutation check:", "all mutants caught" if not survivors else f"{survivors} mutant(s) not caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
