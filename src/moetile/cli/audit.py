"""`moetile audit`: every tile width x boundary row count, every row checked (reference §6)."""

from __future__ import annotations


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError as ex:
        raise SystemExit(f"expected a comma-separated list of integers, got {s!r}") from ex


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="prove every tile width computes every row (NaN-poisoned outputs)")
    p.add_argument("--qtype", default="iq2_xxs", help="Q4_K, Q2_K, IQ2_XXS or Q8_0 (any case), or 'all'")
    p.add_argument("--form", default="all", choices=["all", "auto", "fast", "compact"],
                   help="packed form of IQ2_XXS (default all: both); other types have one form")
    p.add_argument("--n", type=int, default=64, help="output rows N per expert")
    p.add_argument("--k", type=int, default=256, help="inputs K (a multiple of 256)")
    p.add_argument("--rows", default=None, help="pairs per expert to test (default: 1, w-1, w, w+1, 2w+1 per width)")
    p.add_argument("--widths", default="16,32,64,128,256", help="tile widths")
    p.add_argument("--rhs", default="f32", help="f32 (per-token rhs, as gate/up), f16 (per-pair, as down), or both")
    p.add_argument("--experts", type=int, default=8, help="experts E of the test tensors")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.set_defaults(func=run)


def run(args) -> int:
    from ._env import prepare

    interp = prepare()
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ..audit import all_rows, run_audit
    from ..quant import QTYPES, canonical
    from ..quant.pack import resolve_form

    con = Console()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if interp:
        con.print("[yellow]No GPU: the Triton kernels run through Triton's interpreter on the CPU "
                  "(correctness only; keep shapes small).[/]")
    widths = _ints(args.widths)
    rows = _ints(args.rows) if args.rows else all_rows(widths)
    qtypes = list(QTYPES) if args.qtype.lower() == "all" else [canonical(args.qtype)]
    rhss = ["f32", "f16"] if args.rhs == "both" else [args.rhs]
    failed = 0
    forms = ["fast", "compact"] if args.form == "all" else [args.form]
    cases = [(q, f) for q in qtypes for f in dict.fromkeys(resolve_form(q, f) for f in forms)]
    for qtype, form in cases:
        for rhs in rhss:
            total = 2 * len(rows) * len(widths)
            with Progress(transient=True, console=con) as prog:
                task = prog.add_task(f"audit {qtype}/{form} rhs={rhs}", total=total)
                res = run_audit(qtype, args.n, args.k, rows, widths, rhs=rhs, form=_form_arg(form),
                                experts=args.experts, device=device, seed=args.seed,
                                progress=lambda n, task=task: prog.advance(task, n))
            t = Table(title=f"audit {qtype}/{form}, N={args.n}, K={args.k}, rhs={rhs}, {device}"
                            f"{' (interpreter)' if interp else ''}: bad rows (first bad row, max rel err)")
            t.add_column("scenario")
            t.add_column("R")
            for w in widths:
                t.add_column(f"w={w}")
            for scen in ("one-expert", "random"):
                for r in rows:
                    cells = []
                    for w in widths:
                        a = next(x for x in res if x.scenario == scen and x.rows == r and x.width == w)
                        cells.append(f"[green]0[/] ({a.max_err:.1e})" if a.ok else
                                     f"[red]{a.bad_rows}[/] (row {a.first_bad}, {a.max_err:.1e})")
                    t.add_row(scen, str(r), *cells)
            con.print(t)
            failed += sum(not a.ok for a in res)
    if failed:
        con.print(f"[red]AUDIT FAILED: {failed} (width, R) cases with mismatching rows[/]")
        return 1
    con.print("[green]audit clean: every row of every width matches the reference[/]")
    return 0


def _form_arg(form: str) -> str:
    """pack()'s argument for a resolved form name (the one-form types take "auto")."""
    return "auto" if form == "planar" else form
