"""Sweep the launch shapes of the packed mul_mm_id on the GPU: for each op (type/form, gate or down
at DS4 shapes), tile width and T, time every candidate (block_n, block_k, warps, stages).

    python3 benchmarks/scripts/packed_sweep.py CANDIDATES.json OUT.csv [op ...]

CANDIDATES.json: list of {"op": "IQ2_XXS/fast:gate", "BM": 64, "BN": 128, "BK": 256, "warps": 8,
"stages": 2} (made by compiling every shape for sm_90 first and dropping those that spill or
overflow shared memory). Uniform top-6 routing of 256 experts; inputs fixed per (op, T).
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

T_FOR_WIDTH = {16: (512,), 32: (512, 2048), 64: (2048,), 128: (2048, 8192)}


def main() -> None:
    cands = json.load(open(sys.argv[1]))
    only = set(sys.argv[3:])
    sh = B.Shape()
    card = torch.cuda.get_device_name()
    rows = []
    by_op: dict = {}
    for c in cands:
        by_op.setdefault(c["op"], []).append(c)
    t0 = time.time()
    for op, cs in by_op.items():
        if only and op not in only:
            continue
        name, kind = op.split(":")
        qtype, _, form = name.partition("/")
        N, K = (sh.F, sh.H) if kind == "gate" else (sh.H, sh.F)
        g = torch.Generator(device="cuda").manual_seed(0)
        w = pack(random_blocks(qtype, (sh.E, N, K), g, "cuda"), form or "auto")
        for T in sorted({t for c in cs for t in T_FOR_WIDTH[c["BM"]]}):
            ids, _ = B.make_routing("uniform", T, sh, "cuda", seed=T)
            emap = schedule.build_expert_map(ids, sh.E)
            x = (torch.randn(T, K, device="cuda") if kind == "gate" else torch.randn(T, sh.k, K, device="cuda"))
            x = x.half()
            out = torch.empty(T * sh.k, N, device="cuda")
            for c in cs:
                if T not in T_FOR_WIDTH[c["BM"]]:
                    continue
                tiles = schedule.build_tiles(emap, c["BM"])
                cfg = schedule.MMConfig(c["BM"], c["BN"], c["BK"], c["warps"], c["stages"], asm=True)
                try:
                    ms = B.time_ms(partial(mul_mm_id_mapped, x, w, emap, tiles, out=out, config=cfg), reps=10)
                except Exception as e:  # a shape that does not launch (resources): record, go on
                    print(f"{op} T={T} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    ms = float("nan")
                rows.append([card, torch.__version__, triton.__version__, op, T, c["BM"], c["BN"], c["BK"],
                             c["warps"], c["stages"], f"{ms:.4f}"])
                print(f"{time.time() - t0:6.0f}s {op:22s} T={T:5d} w={c['BM']:3d} BN={c['BN']:3d} BK={c['BK']:3d} "
                      f"warps={c['warps']} stages={c['stages']}  {ms:8.3f} ms", flush=True)
        del w
        torch.cuda.empty_cache()
    with open(sys.argv[2], "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["card", "torch", "triton", "op", "T", "width", "block_n", "block_k", "warps", "stages", "ms"])
        wr.writerows(rows)
    best: dict = {}
    for r in rows:
        key = (r[3], r[4], r[5])
        if r[10] != "nan" and (key not in best or float(r[10]) < float(best[key][10])):
            best[key] = r
    print("\nbest per (op, T, width):")
    for key in sorted(best):
        r = best[key]
        print(f"{r[3]:22s} T={r[4]:5d} w={r[5]:3d}: BN={r[6]} BK={r[7]} warps={r[8]} stages={r[9]}  {r[10]} ms")


if __name__ == "__main__":
    main()
