"""`moetile bench-ops`: time of each grouped matmul (gate/up and down shapes) per quant type,
token count and tile width, beside torch bf16 `_grouped_mm` on pre-dequantized weights."""

from __future__ import annotations

from functools import partial


def add_parser(sub) -> None:
    p = sub.add_parser("bench-ops", help="per-op mul_mm_id times per type, T and width, with a bf16 baseline "
                       "(needs a CUDA GPU)")
    p.add_argument("--ops", default="IQ2_XXS/fast:gate,IQ2_XXS/compact:gate,Q2_K:down,Q4_K:gate,Q4_K:down",
                   help="comma list of TYPE[/FORM]:gate (N=F, K=H, per-token rhs) or TYPE[/FORM]:down (N=H, K=F, "
                        "f16 per-pair rhs); FORM is fast or compact (IQ2_XXS), default auto")
    p.add_argument("--tokens", default="1,32,512,2048,8192", help="comma list of token counts T")
    p.add_argument("--widths", default="16,32,64,128", help="comma list of tile widths")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per case (median)")
    p.add_argument("--csv", default=None, help="write the rows to this CSV (with card and versions)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    import triton
    from rich.console import Console
    from rich.table import Table

    from .. import benchmark as B
    from .. import schedule
    from ..ops.mul_mm_id import mul_mm_id_mapped
    from ..quant import random_blocks
    from ..quant.pack import pack

    con = Console()
    if not torch.cuda.is_available():
        con.print("[yellow]moetile bench-ops needs a CUDA GPU; skipped.[/]")
        return 0
    sh = B.Shape()
    rows = []
    card = torch.cuda.get_device_name()
    for spec in args.ops.split(","):
        name, kind = spec.split(":")
        qtype, _, form = name.partition("/")
        N, K = (sh.F, sh.H) if kind == "gate" else (sh.H, sh.F)
        g = torch.Generator(device="cuda").manual_seed(0)
        w = pack(random_blocks(qtype, (sh.E, N, K), g, "cuda"), form or "auto")
        wbf = B.dequantize_bf16(w)
        for T in [int(t) for t in args.tokens.split(",")]:
            ids, _ = B.make_routing("uniform", T, sh, "cuda", seed=T)
            emap = schedule.build_expert_map(ids, sh.E)
            x = (torch.randn(T, K, device="cuda") if kind == "gate"
                 else torch.randn(T, sh.k, K, device="cuda").half())
            out = torch.empty(T * sh.k, N, device="cuda")
            for width in [int(v) for v in args.widths.split(",")]:
                tiles = schedule.build_tiles(emap, width)
                ms = B.time_ms(partial(mul_mm_id_mapped, x, w, emap, tiles, out=out), reps=args.reps)
                rows.append((name, kind, T, f"w={width}", ms))
            order = emap.sorted_pairs.long()
            a = (x[order // sh.k] if kind == "gate" else x.view(T * sh.k, K)[order]).to(torch.bfloat16)
            offs = emap.offsets[1 : sh.E + 1].contiguous()
            try:
                ms = B.time_ms(partial(torch._grouped_mm, a, wbf.transpose(-2, -1), offs=offs), reps=args.reps)
                rows.append((name, kind, T, "torch-bf16 _grouped_mm", ms))
            except (RuntimeError, AttributeError) as ex:
                con.print(f"[yellow]bf16 baseline failed: {ex}[/]")
        del w, wbf
        torch.cuda.empty_cache()
    t = Table(title=f"moetile bench-ops, E={sh.E} k={sh.k}, {card}, torch {torch.__version__}, "
                    f"triton {triton.__version__} (median ms)")
    for c in ("type", "op", "T", "variant", "ms"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r[0], r[1], str(r[2]), r[3], f"{r[4]:.3f}")
    con.print(t)
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["card", "torch", "triton", "type", "op", "T", "variant", "ms"])
            wr.writerows([[card, torch.__version__, triton.__version__, *r] for r in rows])
    return 0
