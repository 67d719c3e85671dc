"""`moetile bench`: the layer analogue of ds4-bench (every tile width, auto, bf16 baseline, floor)."""

from __future__ import annotations

import csv
import itertools
import subprocess
from functools import partial


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time one routed-MoE layer over prefill chunk sizes and decode",
        epilog="In the table, * marks the fastest moetile variant of each routing and T (the torch bf16 "
        "baseline is never starred); '% floor' is the card's floor (the larger of: weight bytes at the "
        "copy bandwidth, FLOPs at the f16 matmul rate, both measured at start) as a share of the time.",
    )
    p.add_argument("--model", default="q2", choices=["q2", "q4"], help="q2: IQ2_XXS gate/up + Q2_K down; q4: Q4_K")
    p.add_argument("--form", default="auto", choices=["auto", "fast", "compact"],
                   help="packed form of IQ2_XXS experts (default auto); other types have one form")
    p.add_argument("--experts", type=int, default=None, help="E (default 256; 8 on CPU)")
    p.add_argument("--topk", type=int, default=6, help="experts per token k")
    p.add_argument("--hidden", type=int, default=None, help="H (default 4096; 256 on CPU)")
    p.add_argument("--ffn", type=int, default=None, help="F (default 2048; 256 on CPU)")
    p.add_argument("--gguf", default=None, help="time real weights: a layer of this GGUF file instead of random ones")
    p.add_argument("--layer", type=int, default=None, help="layer of --gguf (default: the file's first MoE layer)")
    p.add_argument("--tokens-start", type=int, default=None, help="first prefill T (default 512; 16 on CPU)")
    p.add_argument("--tokens-max", type=int, default=None, help="last prefill T (default 16384; 64 on CPU)")
    p.add_argument("--step-mul", type=float, default=2.0, help="factor between successive prefill T")
    p.add_argument("--step-incr", type=int, default=0,
                   help="linear steps of N tokens instead of --step-mul (0: geometric steps)")
    p.add_argument("--gen-tokens", type=int, default=1, help="decode rows: T=1 ... (0 to skip decode)")
    p.add_argument("--routing", default="uniform", help="uniform, zipf, worst, or a comma list")
    p.add_argument("--widths", default="16,32,64,128,256,auto", help="tile widths to time")
    p.add_argument("--no-baseline", action="store_true", help="skip the torch bf16 baseline")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per case (median; 1 on CPU)")
    p.add_argument("--vs", default=None, choices=["transformers"],
                   help="instead: one whole DS4 layer, DS4MoE q2/q4 against transformers' DeepseekV4SparseMoeBlock "
                   "with bf16 experts (grouped_mm, batched_mm) at T = 1, 8, 128, 2048, same run (needs the "
                   "transformers extra; of the other options only --form, --reps and --csv apply)")
    p.add_argument("--csv", default=None, help="append rows to this CSV")
    p.add_argument("--svg", default=None, help="plot tokens/s against T (matplotlib)")
    p.set_defaults(func=run)


def token_sweep(start: int, stop: int, mul: float, incr: int) -> list[int]:
    if start < 1 or stop < start:
        raise SystemExit(f"need 1 <= --tokens-start <= --tokens-max, got {start}, {stop}")
    out, t = [], start
    while t <= stop:
        out.append(t)
        nxt = t + incr if incr > 0 else int(t * mul)
        if nxt <= t:
            raise SystemExit("--step-mul must be > 1 (or give --step-incr)")
        t = nxt
    return out


def run(args) -> int:
    from ._env import prepare

    prepare()
    import torch
    import triton
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .. import benchmark as B

    con = Console()
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    if not gpu:
        con.print("[yellow]No GPU: small shapes through Triton's interpreter. These are NOT performance "
                  "figures; they only show the benchmark runs end to end.[/]")
    if args.vs:
        from .bench_vs import run_vs_transformers

        meta = dict(card=torch.cuda.get_device_name() if gpu else "cpu (interpreter)", torch=torch.__version__,
                    triton=triton.__version__, commit=commit())
        rows = run_vs_transformers(args, con, meta)
        if args.csv:
            write_csv(args.csv, rows)
            con.print(f"rows appended to {args.csv}")
        return 0
    shape = B.Shape(E=args.experts or (256 if gpu else 8), k=args.topk, H=args.hidden or (4096 if gpu else 256),
                    F=args.ffn or (2048 if gpu else 256))
    start = args.tokens_start or (512 if gpu else 16)
    stop = args.tokens_max or (16384 if gpu else 64)
    tokens = ([1] if args.gen_tokens else []) + token_sweep(start, stop, args.step_mul, args.step_incr)
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    routings = [r.strip() for r in args.routing.split(",")]
    reps = args.reps if gpu else 1
    if args.gguf:
        from ..moe import DS4MoE

        layer = first_moe_layer(args.gguf) if args.layer is None else args.layer
        w = DS4MoE.from_gguf(args.gguf, layer, device=dev, form=args.form).weights
        E, H, F = w.dims
        shape = B.Shape(E=E, k=w.top_k, H=H, F=F)
        model = f"{args.gguf}:{layer}"
    else:
        w = B.make_weights(args.model, shape, dev, form=args.form)
        model = args.model
    ceil = B.measure_ceilings() if gpu else None
    base = B.Bf16Baseline(w) if (gpu and not args.no_baseline) else None
    meta = dict(card=torch.cuda.get_device_name() if gpu else "cpu (interpreter)", torch=torch.__version__,
                triton=triton.__version__, commit=commit(), model=model,
                experts=f"{w.gate.qtype}/{w.gate.form}+{w.down.qtype}", E=shape.E, k=shape.k, H=shape.H, F=shape.F)
    if ceil:
        con.print(f"{meta['card']}: copy {ceil.copy_gbs:.0f} GB/s, f16 matmul {ceil.f16_tflops:.0f} TFLOP/s "
                  f"(measured now); torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}")
    rows = []
    from ..schedule import decode_max_tokens, form_key

    dec_max = decode_max_tokens(form_key(w.gate))
    variants = [("decode" if t <= dec_max else None) for t in tokens]
    total = len(routings) * sum(1 if v else len(widths) + (base is not None) for v in variants)
    with Progress(console=con, transient=True) as prog:
        task = prog.add_task("bench", total=total)
        for routing in routings:
            for T in tokens:
                xs = [torch.randn(T, shape.H, device=dev) for _ in range(4)]  # rotated inputs
                ids, rw = B.make_routing(routing, T, shape, dev, seed=T)
                nxt = _rotation(xs)
                floor_ms = None
                if ceil:
                    wb = B.weight_bytes(w, ids)
                    floor_ms = max(wb / ceil.copy_gbs / 1e6, B.layer_flops(T, shape) / ceil.f16_tflops / 1e9)
                cases = [("decode", dict(path="decode"))] if T <= dec_max else [
                    (f"w={x}" if x != "auto" else "auto", dict(tile=int(x) if x != "auto" else "auto", path="prefill"))
                    for x in widths]
                for name, plan in cases:
                    ms = B.time_ms(partial(_layer_call, B.run_layer, w, nxt, ids, rw, plan), reps=reps)
                    rows.append(_row(meta, routing, T, name, ms, shape, w, ids, floor_ms))
                    prog.advance(task)
                if base is not None and T > dec_max:
                    ms = B.time_ms(partial(_base_call, base, nxt, ids, rw), reps=reps)
                    rows.append(_row(meta, routing, T, "torch-bf16", ms, shape, w, ids, floor_ms))
                    prog.advance(task)
    t = Table(title=f"moetile bench {model} ({meta['experts']}), E={shape.E} k={shape.k} H={shape.H} F={shape.F}, "
                    f"{meta['card']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}")
    for c in ("routing", "T", "variant", "ms", "tok/s", "TFLOP/s", "GB/s", "% floor"):
        t.add_column(c, justify="right")
    best = {}
    for r in rows:
        if r["variant"] != "torch-bf16":
            key = (r["routing"], r["T"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in rows:
        star = r["ms"] == best.get((r["routing"], r["T"])) and r["variant"] != "torch-bf16"
        t.add_row(r["routing"], str(r["T"]), r["variant"] + (" *" if star else ""), f"{r['ms']:.3f}",
                  f"{r['tok_s']:.0f}", f"{r['tflops']:.1f}", f"{r['gbs']:.0f}",
                  f"{r['pct_floor']:.0f}%" if r["pct_floor"] is not None else "-")
    con.print(t)
    if args.csv:
        write_csv(args.csv, rows)
        con.print(f"rows appended to {args.csv}")
    if args.svg:
        _plot(args.svg, rows, t.title)
        con.print(f"plot written to {args.svg}")
    return 0


def _rotation(xs):
    it = itertools.count()
    return lambda: xs[next(it) % len(xs)]


def _layer_call(run_layer, w, nxt, ids, rw, plan):
    return run_layer(w, nxt(), ids, rw, **plan)


def _base_call(base, nxt, ids, rw):
    return base(nxt(), ids, rw)


def _row(meta, routing, T, variant, ms, shape, w, ids, floor_ms):
    from .. import benchmark as B

    return dict(meta, routing=routing, T=T, variant=variant, ms=ms, tok_s=T / ms * 1e3,
                tflops=B.layer_flops(T, shape) / ms / 1e9, gbs=B.weight_bytes(w, ids) / ms / 1e6,
                floor_ms=floor_ms, pct_floor=(100 * floor_ms / ms) if floor_ms else None)


def first_moe_layer(path) -> int:
    """The lowest ``blk.L`` of a GGUF file that holds routed experts."""
    from ..gguf_io import open_gguf

    layers = open_gguf(path).layers()
    if not layers:
        raise ValueError(f"{path} holds no MoE layer (no blk.L.ffn_gate_exps.weight)")
    return layers[0]


def write_csv(path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV ``path``, with a header when the file is new or empty."""
    import os

    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(rows[0]):
            raise ValueError(f"{path} holds other columns ({', '.join(header)}): write to a new file")
    with open(path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            wr.writeheader()
        wr.writerows(rows)


def _plot(path, rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.6))
    for routing in sorted({r["routing"] for r in rows}):
        for v in sorted({r["variant"] for r in rows if r["T"] > 8}):
            pts = sorted((r["T"], r["tok_s"]) for r in rows if r["variant"] == v and r["routing"] == routing)
            if pts:
                style = dict(ls="--", color="k") if v == "torch-bf16" else {}
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{v} ({routing})", **style)
        fl = sorted({(r["T"], r["T"] / r["floor_ms"] * 1e3) for r in rows
                     if r["routing"] == routing and r["floor_ms"] and r["T"] > 8})
        if fl:
            ax.plot(*zip(*fl, strict=True), ls=":", color="gray", label=f"floor ({routing})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefill chunk T (tokens)")
    ax.set_ylabel("tokens / s (one layer)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def commit() -> str:
    """The commit benchmarked: $MOETILE_COMMIT if set (a copied tree may carry a stale .git), else git's."""
    import os

    if os.environ.get("MOETILE_COMMIT"):
        return os.environ["MOETILE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
