"""`moetile bench-ep`: a stack of expert-parallel DS4 layers, one rank per GPU, launched with torchrun.

    torchrun --nproc-per-node 2 -m moetile.cli.main bench-ep --model q2 --layers 43 --tokens 8192

Each rank holds E/W experts of every layer (random valid blocks, made on the rank: nothing else is
held) plus the replicated router and shared expert, and runs a prefill of T tokens per rank through
the layers; first it measures the all-to-all bandwidth between the ranks (256 MB). Without torchrun
it runs one rank: the plain one-GPU layer (moe_forward; its stages route, map, gate_up, down, shared,
combine). With several ranks the stages are route, send (the rows' trip, with the shared expert
computed meanwhile), experts, return, combine; all_to_all_share = (send + return) / layer time.
Without a GPU: gloo, the interpreter, tiny shapes.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("bench-ep", help="expert-parallel stack of layers over torch.distributed ranks "
                       "(launch with torchrun, one GPU per rank; prints tokens/s and per-layer stage times)")
    p.add_argument("--model", default="q2", choices=["q2", "q4"], help="q2: IQ2_XXS gate/up + Q2_K down; q4: Q4_K")
    p.add_argument("--form", default="auto", choices=["auto", "fast", "compact"],
                   help="packed form of IQ2_XXS experts (default auto)")
    p.add_argument("--layers", type=int, default=43, help="layers in the stack (DS4 Flash has 43)")
    p.add_argument("--tokens", type=int, default=8192, help="prefill tokens per rank")
    p.add_argument("--reps", type=int, default=3, help="timed passes through the stack (median)")
    p.add_argument("--csv", default=None, help="append one row per rank and stage to this CSV")
    p.set_defaults(func=run)


# one rank's stages (moe_forward's) and several ranks' (ep_moe_forward's): fixed CSV columns, 0 where absent
STAGES = ("route", "map", "gate_up", "down", "shared", "send", "experts", "return", "combine")


def _init():
    """The process group from torchrun's environment, or a group of one."""
    import os
    import socket

    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _all_to_all_gbs(dev, world: int, nbytes: int) -> float:
    """Bytes this rank sends to the other ranks per second in an all_to_all_single of ``nbytes``
    (median of 5, after one warm-up), GB/s; 0 for one rank."""
    import statistics
    import time

    import torch
    import torch.distributed as dist

    if world == 1:
        return 0.0
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    out = torch.empty_like(buf)
    times = []
    for i in range(6):
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_to_all_single(out, buf)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return nbytes * (world - 1) / world / statistics.median(times) / 1e9


def run(args) -> int:
    import statistics
    import time

    import torch
    import torch.distributed as dist
    from rich.console import Console

    from .. import benchmark as B
    from ..distributed import EPMoE, ShardedMoE, ep_moe_forward
    from ..moe import MoEWeights
    from ..quant import random_blocks

    dev = _init()
    rank, world = dist.get_rank(), dist.get_world_size()
    con = Console()
    try:
        gpu = dev.type == "cuda"
        sh = B.Shape() if gpu else B.Shape(E=8, k=2, H=256, F=256)
        L, T = (args.layers, args.tokens) if gpu else (min(args.layers, 2), min(args.tokens, 8))
        if not gpu and rank == 0:
            con.print("[yellow]no CUDA GPU: gloo and Triton's interpreter on tiny shapes (E=8, H=F=256, "
                      f"{L} layers, {T} tokens a rank); no meaningful timings[/]")
        if sh.E % world:
            raise ValueError(f"{sh.E} experts do not split over {world} ranks")
        n = sh.E // world
        gq, dq = B.PRESETS[args.model]
        layers = []
        for layer in range(L):
            g = torch.Generator(device=dev).manual_seed(1000 * layer + rank)  # this rank's experts only
            gs = torch.Generator(device=dev).manual_seed(1000 * layer + 999)  # replicated tensors: same seed
            local = MoEWeights(
                random_blocks(gq, (n, sh.F, sh.H), g, dev), random_blocks(gq, (n, sh.F, sh.H), g, dev),
                random_blocks(dq, (n, sh.H, sh.F), g, dev), shared_gate=random_blocks("Q8_0", (sh.F, sh.H), gs, dev),
                shared_up=random_blocks("Q8_0", (sh.F, sh.H), gs, dev),
                shared_down=random_blocks("Q8_0", (sh.H, sh.F), gs, dev), top_k=1)
            router = (torch.randn(sh.E, sh.H, device=dev, generator=gs) * 0.02).half()
            bias = torch.rand(sh.E, device=dev, generator=gs) * 0.01
            sharded = ShardedMoE(local, sh.E, rank, world, router, bias, None, sh.k, 1.5)
            layers.append(EPMoE(sharded, form=args.form, validate=False))
        a2a_gbs = _all_to_all_gbs(dev, world, (256 << 20) if gpu else (1 << 20))
        x = torch.randn(T, sh.H, device=dev, generator=torch.Generator(device=dev).manual_seed(rank))
        stages: dict[str, list[float]] = {}
        totals = []
        for rep in range(args.reps + 1):  # the first pass compiles and warms up
            marks: list[tuple[str, object]] = []

            def hook(name, marks=marks):
                if gpu:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    marks.append((name, ev))
                else:
                    marks.append((name, time.perf_counter()))

            dist.barrier()
            hook("start")
            for layer in layers:
                ep_moe_forward(x, layer.sharded, group=layer.group, validate=False, stage_hook=hook)
            if gpu:
                torch.cuda.synchronize()
            if rep == 0:
                continue
            per: dict[str, float] = {}
            for (_, a), (name, b) in zip(marks, marks[1:], strict=False):
                ms = a.elapsed_time(b) if gpu else (b - a) * 1e3
                per[name] = per.get(name, 0.0) + ms
            for name, ms in per.items():
                stages.setdefault(name, []).append(ms / L)
            totals.append(sum(per.values()))
        total = statistics.median(totals)
        per_layer = {k: statistics.median(stages[k]) if k in stages else 0.0 for k in STAGES}
        # send holds the rows' trip and the shared expert computed meanwhile; return is the results' trip
        comm = per_layer.get("send", 0.0) + per_layer.get("return", 0.0)
        row = dict(rank=rank, world=world, model=args.model, layers=L, tokens_per_rank=T,
                   stack_ms=round(total, 3), tokens_per_s=round(T * world / (total / 1e3)),
                   **{f"{k}_ms_per_layer": round(v, 4) for k, v in per_layer.items()},
                   all_to_all_share=round(comm / (total / L), 3),
                   gpu_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if gpu else 0.0,
                   all_to_all_gbs=round(a2a_gbs, 1))
        rows = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            for r in rows:
                con.print(r)
            if args.csv:
                from .bench import write_csv

                write_csv(args.csv, rows)
    finally:
        dist.destroy_process_group()
    return 0
