"""`moetile bench-ep` under torchrun with two ranks (gloo and the interpreter on CPU, tiny shapes; on
a GPU machine one rank per GPU): it runs end to end and writes one CSV row per rank with the stage
split."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ep_two_ranks(tmp_path):
    import torch

    out = tmp_path / "ep.csv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    ranks = 2 if not torch.cuda.is_available() or torch.cuda.device_count() >= 2 else 1  # one GPU per rank
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m",
                          "moetile.cli.main", "bench-ep", "--reps", "1", "--layers", "2", "--tokens", "8",
                          "--csv", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["rank"] for r in rows] == [str(i) for i in range(ranks)] and all(r["world"] == str(ranks) for r in rows)
    # one rank runs the plain layer (moe_forward's stages); several exchange rows between the stages
    names = ("route", "send", "experts", "return", "combine") if ranks > 1 else ("route", "gate_up", "down", "combine")
    for r in rows:
        parts = [float(r[f"{s}_ms_per_layer"]) for s in names]
        assert float(r["map_ms_per_layer"]) == 0 if ranks > 1 else float(r["send_ms_per_layer"]) == 0
        assert 0 <= float(r["all_to_all_share"]) < 1
        assert all(p > 0 for p in parts) and float(r["tokens_per_s"]) > 0
