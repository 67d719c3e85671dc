"""`moetile bench --vs transformers`: DS4MoE q2/q4 against transformers' DeepseekV4SparseMoeBlock on the
same (dequantized q4) weights, same run; on CPU tiny shapes through the interpreter (runs end to end,
and the q4 layer computes what the block computes)."""

from __future__ import annotations

import csv

import pytest

from moetile.cli import main as cli

pytest.importorskip("transformers")


def test_bench_vs_transformers(tmp_path, capsys):
    import torch

    out = tmp_path / "vs.csv"
    assert cli.main(["bench", "--vs", "transformers", "--reps", "2", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DeepseekV4SparseMoeBlock" in text and "experts GB" in text
    rows = list(csv.DictReader(out.open()))
    tokens = {1, 8} if not torch.cuda.is_available() else {1, 8, 128, 2048}
    assert {int(r["T"]) for r in rows} == tokens
    for T in tokens:
        names = {r["variant"] for r in rows if int(r["T"]) == T}
        want = {"transformers grouped_mm", "moetile q2", "moetile q4"} | ({"transformers batched_mm"} if T <= 128
                                                                          else set())
        assert names == want, T
    for r in rows:
        assert float(r["ms"]) > 0 and int(r["experts_bytes"]) > 0
        assert float(r["q4_vs_block"]) < 2e-2  # the same layer: f16 activations inside moetile, bf16 in the block
    q2, q4, bf16 = (next(int(r["experts_bytes"]) for r in rows if r["variant"] == v)
                    for v in ("moetile q2", "moetile q4", "transformers grouped_mm"))
    assert q2 < q4 < bf16 / 3
