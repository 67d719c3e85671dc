"""Sweep the launch shapes of the packed mul_mm_id on the GPU: for each op (type/form, gate or down
at DS4 shapes), tile width and T, time every candidate (block_n, block_k, warps, stages).

    python3 benchmarks/scripts/packed_sweep.py CANDIDATES.json OUT.csv [op ...]

Kernels are compiled first by 12 worker processes (tiny E, same specialisation), then timed in
this process from Triton's cache.

CANDIDATES.json: list of {"op": "IQ2_XXS/fast:gate", "BM": 64, "BN": 128, "BK": 256, "warps": 8,
"stages": 2}; op kinds: gate (N=F, K=H, per-token rhs), gateup (the fused gate+up+SwiGLU kernel),
down (N=H, K=F, per-pair rhs). Uniform top-6 routing of 256 experts; inputs fixed per (op, E, k, T).
A candidate may also name "E" and "k" (E=1, k=1: the shared expert, a dense matmul; the CSV names E,
not k) and "T" (a list of token counts; otherwise T_FOR_WIDTH). Each output is compared with the
first candidate's of the same (op, E, k, T), so list the policy's shape first: "rel" is
max|out - first| / max|first| (NaN where a row was not written, or where the first was NaN).
"""

import csv
import json
import sys
import time
from functools import partial

import torch
import triton

from moetile import benchmark as B
from moetile import schedule
from moetile.ops.mul_mm_id import mul_mm_id_mapped
from moetile.quant import random_blocks
from moetile.quant.pack import pack

T_FOR_WIDTH = {16: (128, 512), 32: (128, 512, 2048), 64: (2048,), 128: (2048, 8192), 256: (8192,)}


def _operands(sh, op, T):
    """(w, w_up or None, rhs f16, out, route weights or None) of an op at T tokens."""
    name, kind = op.split(":")
    qtype, _, form = name.partition("/")
    N, K = (sh.H, sh.F) if kind == "down" else (sh.F, sh.H)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = pack(random_blocks(qtype, (sh.E, N, K), g, "cuda"), form or "auto")
    up = pack(random_blocks(qtype, (sh.E, N, K), g, "cuda"), form or "auto") if kind == "gateup" else None
    x = (torch.randn(T, sh.k, K, device="cuda") if kind == "down" else torch.randn(T, K, device="cuda")).half()
    out = torch.empty(T * sh.k, N, device="cuda", dtype=torch.float16 if up is not None else torch.float32)
    rw = torch.rand(T * sh.k, device="cuda") if up is not None else None
    return w, up, x, out, rw


def _shape(c, compile_only: bool = False) -> B.Shape:
    E = c.get("E", 256)
    return B.Shape(E=min(E, 16) if compile_only else E, k=c.get("k", 6))


def _ts(c) -> tuple:
    return tuple(c["T"]) if "T" in c else T_FOR_WIDTH[c["BM"]]


def _compile(cs) -> int:
    """Launch each candidate once on a stack of at most 16 experts (same kernel specialisation), so
    the timing process finds it in Triton's cache."""
    n = 0
    for c in cs:
        sh = _shape(c, compile_only=True)
        name, kind = c["op"].split(":")
        qtype, _, form = name.partition("/")
        w, up, x, out, rw = _operands(sh, c["op"], 64)
        ids, _ = B.make_routing("uniform", 64, sh, "cuda")
        emap = schedule.build_expert_map(ids, sh.E)
        cfg = schedule.MMConfig(c["BM"], c["BN"], c["BK"], c["warps"], c["stages"], asm=True)
        try:
            mul_mm_id_mapped(x, w, emap, schedule.build_tiles(emap, c["BM"]), out=out, config=cfg, w_up=up,
                             route_weights=rw)
            n += 1
        except Exception as e:
            print(f"compile {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    torch.cuda.synchronize()
    return n


def main() -> None:
    cands = json.load(open(sys.argv[1]))
    only = set(sys.argv[3:])
    if only:
        cands = [c for c in cands if c["op"] in only]
    import multiprocessing as mp

    t0 = time.time()
    with mp.get_context("spawn").Pool(12) as pool:
        done = sum(pool.map(_compile, [cands[i::12] for i in range(12)]))
    print(f"compiled {done} of {len(cands)} in {time.time() - t0:.0f}s", flush=True)
    card = torch.cuda.get_device_name()
    rows = []
    by_op: dict = {}
    for c in cands:
        by_op.setdefault((c["op"], c.get("E", 256), c.get("k", 6)), []).append(c)
    t0 = time.time()
    for (op, _, _), cs in by_op.items():
        sh = _shape(cs[0])
        for T in sorted({t for c in cs for t in _ts(c)}):
            ids, _ = B.make_routing("uniform", T, sh, "cuda", seed=T)
            emap = schedule.build_expert_map(ids, sh.E)
            w, up, x, out, rw = _operands(sh, op, T)
            first = None
            for c in cs:
                if T not in _ts(c):
                    continue
                tiles = schedule.build_tiles(emap, c["BM"])
                cfg = schedule.MMConfig(c["BM"], c["BN"], c["BK"], c["warps"], c["stages"], asm=True)
                try:
                    out.fill_(float("nan"))
                    ms = B.time_ms(partial(mul_mm_id_mapped, x, w, emap, tiles, out=out, config=cfg, w_up=up,
                                           route_weights=rw), reps=10)
                    got = out.float()
                    if first is None:
                        first = got.clone()
                    rel = ((got - first).abs().max() / first.abs().max()).item()  # NaN if a row was missed
                except Exception as e:  # a shape that does not launch (resources): record, go on
                    print(f"{op} T={T} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    ms, rel = float("nan"), float("nan")
                rows.append([card, torch.__version__, triton.__version__, op, sh.E, T, c["BM"], c["BN"], c["BK"],
                             c["warps"], c["stages"], f"{ms:.4f}", f"{rel:.2e}"])
                print(f"{time.time() - t0:6.0f}s {op:22s} E={sh.E:3d} T={T:5d} w={c['BM']:3d} BN={c['BN']:3d} "
                      f"BK={c['BK']:3d} warps={c['warps']} stages={c['stages']}  {ms:8.3f} ms  rel {rel:.1e}",
                      flush=True)
            del w, up
            torch.cuda.empty_cache()
    with open(sys.argv[2], "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["card", "torch", "triton", "op", "E", "T", "width", "block_n", "block_k", "warps", "stages",
                     "ms", "rel"])
        wr.writerows(rows)
    best: dict = {}
    for r in rows:
        key = (r[3], r[4], r[5], r[6])
        ok = r[11] != "nan" and float(r[12]) < 1e-2  # a shape that computes something else never wins
        if ok and (key not in best or float(r[11]) < float(best[key][11])):
            best[key] = r
    print("\nbest per (op, E, T, width):")
    for key in sorted(best):
        r = best[key]
        print(f"{r[3]:22s} E={r[4]:3d} T={r[5]:5d} w={r[6]:3d}: BN={r[7]} BK={r[8]} warps={r[9]} stages={r[10]}  "
              f"{r[11]} ms (rel {r[12]})")


if __name__ == "__main__":
    main()
