"""`moetile profile`: GPU time per stage of one full layer (route, map, gate_up, down, shared, combine)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="per-stage GPU time of one layer, ds4 layer-stage-profile style "
                       "(needs a CUDA GPU: the stages are timed with CUDA events)")
    p.add_argument("--model", default="q2", choices=["q2", "q4"], help="q2: IQ2_XXS gate/up + Q2_K down; q4: Q4_K")
    p.add_argument("--form", default="auto", choices=["auto", "fast", "compact"],
                   help="packed form of IQ2_XXS experts (default auto)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens T of the layer call")
    p.add_argument("--tile", default="auto", help="auto, ds4 or a width")
    p.add_argument("--gate-up", default="auto", choices=["auto", "fused", "split"],
                   help="gate/up as one fused kernel or two (auto: the schedule's choice)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--csv", default=None, help="append a row per stage to this CSV (header, card, versions, commit)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from .. import benchmark as B
    from ..moe import MoEWeights
    from ..quant import random_blocks

    con = Console()
    if not torch.cuda.is_available():
        con.print("[yellow]moetile profile needs a CUDA GPU (stage times are CUDA events); skipped.[/]")
        return 0
    shape = B.Shape()
    w = B.make_weights(args.model, shape, "cuda", form=args.form)
    g = torch.Generator(device="cuda").manual_seed(1)
    router = (torch.randn(shape.E, shape.H, device="cuda", generator=g) * 0.02).half()
    w = MoEWeights(w.gate, w.up, w.down, router=router,
                   bias=torch.rand(shape.E, device="cuda", generator=g) * 0.01,
                   shared_gate=random_blocks("Q8_0", (shape.F, shape.H), g, "cuda"),
                   shared_up=random_blocks("Q8_0", (shape.F, shape.H), g, "cuda"),
                   shared_down=random_blocks("Q8_0", (shape.H, shape.F), g, "cuda"), top_k=shape.k).packed()
    tile = int(args.tile) if args.tile.isdigit() else args.tile
    x = torch.randn(args.tokens, shape.H, device="cuda", generator=g)
    stages = B.profile_layer(w, x, reps=args.reps, tile=tile, gate_up=args.gate_up)
    total = sum(stages.values())
    t = Table(title=f"moetile profile {args.model}, T={args.tokens}, tile={args.tile}, gate_up={args.gate_up}, "
                    f"{torch.cuda.get_device_name()} (median of {args.reps})")
    for c in ("stage", "ms", "share"):
        t.add_column(c, justify="right")
    for n, ms in stages.items():
        t.add_row(n, f"{ms:.3f}", f"{100 * ms / total:.1f}%")
    t.add_row("total", f"{total:.3f}", "100%")
    con.print(t)
    if args.csv:
        import triton

        from .bench import commit, write_csv

        meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    commit=commit(), model=args.model, form=args.form, T=args.tokens, tile=args.tile,
                    gate_up=args.gate_up, reps=args.reps)
        write_csv(args.csv, [dict(meta, stage=n, ms=round(ms, 4)) for n, ms in stages.items()])
    return 0
