"""The console script: one-line errors for a user's mistakes, help texts, defaults, CSV output."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from moetile.cli import main as cli
from moetile.cli.bench import first_moe_layer, write_csv

GOLDEN = Path(__file__).parents[1] / "data" / "golden_q2.gguf"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--gguf", "missing.gguf"], "moetile bench: error: GGUF file not found: missing.gguf"),
        (["bench", "--gguf", str(GOLDEN), "--layer", "7"], r"no MoE layer blk\.7 .*the file's MoE layers: \[0\]"),
        (["bench", "--gguf", __file__], "is not a GGUF file"),
    ],
)
def test_user_mistakes_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "bench", "--gguf", "missing.gguf"])


def test_bad_tile_max_fails_at_start_and_on_every_path(monkeypatch, capsys):
    monkeypatch.setenv("MOETILE_TILE_MAX", "48")
    assert cli.main(["info"]) == 2
    assert "MOETILE_TILE_MAX='48' is not a tile width" in capsys.readouterr().err
    from moetile.moe import DS4MoE

    m = DS4MoE.from_gguf(GOLDEN, 0)
    with pytest.raises(ValueError, match="MOETILE_TILE_MAX"):
        m(torch.randn(3, m.weights.dims[1]))


def test_help_texts():
    parser = cli.build_parser()
    assert parser.description == cli.DESCRIPTION and "Entry point" not in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert p.description, name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
        assert "(default: None)" not in text, name
    flat = {name: " ".join(p.format_help().split()) for name, p in sub.choices.items()}  # unwrapped
    assert "(default: 20)" in flat["bench"] and "* marks the fastest" in flat["bench"]
    assert "needs a CUDA GPU" in flat["profile"] and "needs a CUDA GPU" in flat["bench-ops"]


def test_first_moe_layer(tmp_path):
    from moetile.gguf_io import write_gguf

    assert first_moe_layer(GOLDEN) == 0
    path = tmp_path / "none.gguf"
    write_gguf(path, {"x": torch.ones(4)}, {})
    with pytest.raises(ValueError, match="holds no MoE layer"):
        first_moe_layer(path)


def test_write_csv_has_one_header(tmp_path):
    path = tmp_path / "p.csv"
    write_csv(path, [dict(card="c", stage="route", ms=0.1)])
    write_csv(path, [dict(card="c", stage="map", ms=0.2)])
    rows = list(csv.DictReader(open(path)))
    assert [r["stage"] for r in rows] == ["route", "map"] and rows[0]["card"] == "c"
    with pytest.raises(ValueError, match="holds other columns"):  # appending other columns would misalign them
        write_csv(path, [dict(card="c", ms=0.3)])
    assert len(list(csv.DictReader(open(path)))) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the main job takes minutes: `make run` there")
def test_main_job_runs_end_to_end(tmp_path, capsys):
    """`moetile run` (README's main command) builds each step's arguments from that command's own
    parser: a new option of a step cannot break it (bench --vs once did)."""
    assert cli.main(["run", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.csv").exists() and "done" in capsys.readouterr().out


def test_main_job_steps_take_their_parsers_defaults():
    from moetile.cli.run import _args

    b = _args("bench", model="q4")
    assert b.model == "q4" and b.vs is None and b.reps == 20
    with pytest.raises(TypeError, match="no option"):
        _args("bench", not_an_option=1)
