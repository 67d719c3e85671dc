"""Seeded fuzz of the GGUF loader on the golden file: single-byte changes anywhere in the header
and truncations anywhere in the file. Every case must load the MoE layer byte-identical to the
intact file or raise ValueError (GGUFError is one) — no other exception, no crash, no hang."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
import torch

from moetile.gguf_io import layer_tensor_names, open_gguf

GOLDEN = Path(__file__).parent / "data" / "golden_q2.gguf"
SEED = 20261125
N_FLIPS, N_CUTS = 1200, 80
CASE_LIMIT_S = 5  # a case that takes longer is a hang
BUDGET_S = 60


def _layer_bytes(path: Path) -> dict[str, bytes]:
    lt = open_gguf(path).moe_layer(0)
    out = {}
    for field in layer_tensor_names(0):
        t = getattr(lt, field)
        if t is not None:
            t = t.data if hasattr(t, "qtype") else t
            out[field] = bytes(t.contiguous().view(torch.uint8).reshape(-1).numpy())
    return out


def _cases(blob: bytes, header_end: int) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    cases = []
    for _ in range(N_FLIPS):
        at = rng.randrange(header_end)
        new = rng.choice([0x00, 0xFF, blob[at] ^ 0x01, blob[at] ^ 0x80, rng.randrange(256)])
        if new != blob[at]:
            cases.append((f"byte {at}: {blob[at]:#04x} -> {new:#04x}", blob[:at] + bytes([new]) + blob[at + 1 :]))
    cuts = {rng.randrange(header_end) for _ in range(N_CUTS // 2)}
    cuts |= {rng.randrange(len(blob)) for _ in range(N_CUTS // 2)}
    cases += [(f"cut at {c}", blob[:c]) for c in sorted(cuts)]
    return cases


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM to bound each case")
def test_header_flips_and_truncations(tmp_path):
    blob = GOLDEN.read_bytes()
    want = _layer_bytes(GOLDEN)
    header_end = open_gguf(GOLDEN)._r.data_offset
    cases = _cases(blob, header_end)
    assert len(cases) >= 1000
    path = tmp_path / "fuzz.gguf"
    outcomes = {"identical": 0, "ValueError": 0}
    old = signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.perf_counter()
    try:
        for what, data in cases:
            path.write_bytes(data)
            signal.alarm(CASE_LIMIT_S)
            try:
                got = _layer_bytes(path)
            except ValueError:
                outcomes["ValueError"] += 1
                continue
            except _Hang:
                pytest.fail(f"{what}: loading took more than {CASE_LIMIT_S} s")
            except Exception as exc:  # anything else escaped the loader's checks
                pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
            finally:
                signal.alarm(0)
            assert got == want, f"{what}: loaded without error but the layer's tensors differ"
            outcomes["identical"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    elapsed = time.perf_counter() - t0
    assert elapsed < BUDGET_S, f"{len(cases)} cases took {elapsed:.0f} s"
    # both outcomes must occur, or the cases do not probe what they claim to
    assert outcomes["identical"] > 50 and outcomes["ValueError"] > 500, outcomes
