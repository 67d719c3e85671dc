"""Plot the layer benchmark before and after the packed forms (one H100 run, both trees) from the CSVs
of `moetile bench`: tokens/s of the best width and of `auto` against T, the bf16 baseline and the floor.
Run: python3 benchmarks/scripts/plot_layer_ab.py NEW.csv OLD.csv OUTDIR"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

new, old, outdir = sys.argv[1:4]


def load(path):
    rows = defaultdict(dict)
    floor = {}
    meta = {}
    for r in csv.DictReader(open(path)):
        T = int(r["T"])
        rows[(r["model"], T)][r["variant"]] = float(r["tok_s"])
        if r["floor_ms"]:
            floor[(r["model"], T)] = T / float(r["floor_ms"]) * 1e3
        meta[r["model"]] = (r["card"], r["torch"], r["triton"], r["commit"], r["experts"])
    return rows, floor, meta


n, nf, nm = load(new)
o, _, om = load(old)
for model in sorted(nm):
    Ts = sorted(T for (m, T) in n if m == model and T > 8)
    fig, ax = plt.subplots(figsize=(9, 5.4))
    best = lambda d, m, T: max(v for k, v in d[(m, T)].items() if k != "torch-bf16")
    ax.plot(Ts, [n[(model, T)]["auto"] for T in Ts], marker="o", label=f"packed, auto ({nm[model][3]})")
    ax.plot(Ts, [best(n, model, T) for T in Ts], marker=".", ls="--", label="packed, best width")
    ax.plot(Ts, [best(o, model, T) for T in Ts], marker="s", label=f"before: GGUF bytes, best width ({om[model][3]})")
    ax.plot(Ts, [n[(model, T)]["torch-bf16"] for T in Ts], ls="--", color="k", label="torch bf16 _grouped_mm")
    ax.plot(Ts, [nf[(model, T)] for T in Ts], ls=":", color="gray", label="floor (bytes or f16 MMA)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefill chunk T (tokens)")
    ax.set_ylabel("tokens / s (one DS4 Flash MoE layer, routing given)")
    card, tv, trv, _, experts = nm[model]
    ax.set_title(f"{model} ({experts}), {card}, torch {tv}, triton {trv}, same run", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{outdir}/bench_{model}_h100.svg")
    fig.savefig(f"/tmp/bench_{model}_h100.png")
