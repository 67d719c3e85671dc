"""`moetile run`: the main job. On a GPU: info, the audit of every type and RHS, a short bench
of q2 and q4 (decode, 512, 2048, 8192) and a profile. Without a GPU: the same steps on small
shapes through Triton's interpreter, which checks correctness but measures nothing."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the main job: info + audit + bench (+ profile on a GPU)")
    p.add_argument("--out", default="out", help="folder for the CSV and SVG files")
    p.set_defaults(func=run)


def run(args) -> int:
    from ._env import prepare

    interp = prepare()
    import os

    import torch
    from rich.console import Console

    from ..quant.pack import resolve_form
    from ..schedule import decode_max_tokens
    from . import audit, bench, info, profile

    con = Console()
    gpu = torch.cuda.is_available()
    os.makedirs(args.out, exist_ok=True)
    if interp:
        con.print("[yellow]CPU only: the kernels run through Triton's interpreter on small shapes; "
                  "no figure below is a performance figure.[/]")
    rc = info.run(_args("info"))
    con.rule("audit")
    a = dict(n=64, k=768, rows=None, widths="16,32,64,128,256", experts=8, seed=0, form="all")
    if gpu:
        rc |= audit.run(_args("audit", qtype="all", rhs="both", **a))
    else:
        rc |= audit.run(_args("audit", qtype="q4_k", rhs="f32", **dict(a, k=512, widths="32,64")))
    con.rule("bench")
    for model in ("q2", "q4"):
        b = dict(model=model, form="auto", experts=None, topk=6, hidden=None, ffn=None, gguf=None, layer=None,
                 step_mul=4.0 if gpu else 2.0, step_incr=0, gen_tokens=1, routing="uniform",
                 no_baseline=False, reps=20, csv=os.path.join(args.out, "bench.csv"),
                 svg=os.path.join(args.out, f"bench_{model}.svg"))
        if gpu:
            b.update(tokens_start=512, tokens_max=8192, widths="16,64,128,256,auto")
        else:  # the prefill kernels at the smallest T the policy gives them (the mat-vec is slow there)
            t = decode_max_tokens(f"IQ2_XXS/{resolve_form('IQ2_XXS')}") + 1  # q2's gate/up
            b.update(tokens_start=t, tokens_max=t, widths="16,auto", gen_tokens=0)
        rc |= bench.run(_args("bench", **b))
        if not gpu:
            break
    if gpu:
        con.rule("profile")
        for model in ("q2", "q4"):
            rc |= profile.run(_args("profile", model=model, form="auto", tokens=2048, tile="auto",
                                    gate_up="auto", reps=10, csv=os.path.join(args.out, "profile.csv")))
    con.rule("[green]done[/]" if rc == 0 else "[red]FAILED[/]")
    return rc


def _args(cmd: str, **kw) -> argparse.Namespace:
    """The arguments of command ``cmd`` as its own parser defaults them, with ``kw`` set: a new
    option of a command needs no change here."""
    from .main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    args = {a.dest: a.default for a in sub._actions if a.dest != "help"}
    unknown = set(kw) - set(args)
    if unknown:
        raise TypeError(f"moetile {cmd} has no option {sorted(unknown)}")
    return argparse.Namespace(**{**args, **kw})
