"""`moetile bench --vs transformers`: one whole DS4 Flash MoE layer (router, routed experts, shared
expert, combine), moetile's DS4MoE (q2, q4) against transformers' own ``DeepseekV4SparseMoeBlock``
with bf16 experts ("grouped_mm" and "batched_mm"), same run, eager forwards (each variant timed in two
interleaved rounds; the faster median is kept and both are in the CSV).

The bf16 block holds the q4 layer's experts dequantized, and its shared expert the dequantized Q8_0
shared expert of both moetile layers; the routers share one weight and bias. So the q4 layer and the
block compute the same function (their outputs' median row difference is printed as a check), and the
q2 layer the same shapes with 2-bit experts. "batched_mm" gathers every pair's expert weights, so it
runs only up to ``BATCHED_MM_MAX_T`` tokens.
"""

from __future__ import annotations

BATCHED_MM_MAX_T = 128
TOKENS_GPU = (1, 8, 128, 2048)
TOKENS_CPU = (1, 8)


def run_vs_transformers(args, con, meta: dict) -> list[dict]:
    """Time the four variants at each T; print the table; return the CSV rows."""
    import statistics

    import torch
    from rich.table import Table

    from .. import benchmark as B
    from ..moe import DS4MoE, MoEWeights
    from ..quant import random_blocks
    from .bench import _rotation

    try:
        import transformers
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock
    except ImportError as exc:
        raise ValueError("--vs transformers needs transformers >= 5.24 with DeepSeek V4: "
                         "pip install 'moetile[transformers]'") from exc
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    E, k, H, F = (256, 6, 4096, 2048) if gpu else (8, 2, 256, 256)
    tokens = TOKENS_GPU if gpu else TOKENS_CPU
    reps = args.reps if gpu else 1
    meta = dict(meta, transformers=transformers.__version__, E=E, k=k, H=H, F=F)
    g = torch.Generator(device=dev).manual_seed(0)
    q = {m: B.make_weights(m, B.Shape(E=E, k=k, H=H, F=F), dev, seed=i + 1, form=args.form)
         for i, m in enumerate(("q2", "q4"))}
    shared = [random_blocks("Q8_0", s, g, dev) for s in ((F, H), (F, H), (H, F))]
    router = (torch.randn(E, H, device=dev, generator=g) * 0.02).bfloat16().float()  # the block holds it in bf16
    bias = torch.rand(E, device=dev, generator=g) * 0.05

    cfg = transformers.DeepseekV4Config(
        hidden_size=H, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=k, num_hidden_layers=1,
        mlp_layer_types=["moe"], layer_types=["sliding_attention"], num_nextn_predict_layers=0)
    cfg._experts_implementation = "grouped_mm"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no f32 copy of the bf16 experts on the way
    try:
        with torch.device(dev):
            block = DeepseekV4SparseMoeBlock(cfg, 0).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.gate.e_score_correction_bias.copy_(bias)
        sh = block.shared_experts
        for lin, t in zip((sh.gate_proj, sh.up_proj, sh.down_proj), shared, strict=True):
            lin.weight.copy_(t.dequantize(torch.bfloat16))
        w4, ex = q["q4"], block.experts
        for s in range(0, E, 32):  # a few experts at a time: no f32 copy of them all
            t = min(s + 32, E)
            ex.gate_up_proj[s:t, :F].copy_(w4.gate.experts(s, t).dequantize(torch.bfloat16))
            ex.gate_up_proj[s:t, F:].copy_(w4.up.experts(s, t).dequantize(torch.bfloat16))
            ex.down_proj[s:t].copy_(w4.down.experts(s, t).dequantize(torch.bfloat16))
    scale = float(block.gate.routed_scaling_factor)
    layers = {m: DS4MoE(MoEWeights(w.gate, w.up, w.down, router=router, bias=bias, shared_gate=shared[0],
                                   shared_up=shared[1], shared_down=shared[2], top_k=k, scale=scale,
                                   clamp=float(cfg.swiglu_limit)), validate=False)
              for m, w in q.items()}

    def impl(name):
        def call(x):
            ex.config._experts_implementation = name
            return block(x.unsqueeze(0))
        return call

    variants = {"transformers grouped_mm": impl("grouped_mm"), "transformers batched_mm": impl("batched_mm"),
                "moetile q2": layers["q2"], "moetile q4": layers["q4"]}
    rows, check = [], {}
    with torch.no_grad():
        for T in tokens:
            xs = [torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16) for _ in range(3)]
            runs = {}
            for _ in range(2):  # two rounds, variants interleaved: warm-up and clock drift hit all alike
                for name, fn in variants.items():
                    if name.endswith("batched_mm") and T > BATCHED_MM_MAX_T:
                        continue
                    nxt = _rotation(xs)
                    runs.setdefault(name, []).append(B.time_ms(lambda fn=fn, nxt=nxt: fn(nxt()), reps=reps))
            rows += [dict(meta, T=T, variant=name, ms=min(v), ms_rounds=" ".join(f"{m:.3f}" for m in v))
                     for name, v in runs.items()]
            a = layers["q4"](xs[0]).float()
            b = impl("grouped_mm")(xs[0]).reshape(T, H).float()
            check[T] = statistics.median(((a - b).norm(dim=1) / b.norm(dim=1)).tolist())
    mem = {"transformers grouped_mm": ex.gate_up_proj.nbytes + ex.down_proj.nbytes,
           "moetile q2": _expert_bytes(q["q2"]), "moetile q4": _expert_bytes(q["q4"])}
    mem["transformers batched_mm"] = mem["transformers grouped_mm"]

    t = Table(title=f"one DS4 layer, ms per forward (eager): moetile DS4MoE vs transformers "
                    f"{meta['transformers']} DeepseekV4SparseMoeBlock (bf16 experts); E={E} k={k} H={H} F={F}, "
                    f"{meta['card']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}")
    t.add_column("T", justify="right")
    for name in variants:
        t.add_column(name, justify="right")
    for T in tokens:
        by = {r["variant"]: r["ms"] for r in rows if r["T"] == T}
        t.add_row(str(T), *(f"{by[n]:.3f}" if n in by else "-" for n in variants))
    t.add_row("experts GB", *(f"{mem[n] / 1e9:.3f}" for n in variants))
    con.print(t)
    con.print("q4 layer vs the grouped_mm block on the same weights, median row relative difference: "
              + ", ".join(f"T={T}: {e:.1e}" for T, e in check.items()))
    return [dict(r, experts_bytes=mem[r["variant"]], q4_vs_block=check[r["T"]]) for r in rows]


def _expert_bytes(w) -> int:
    return sum(t.nbytes for t in (w.gate, w.up, w.down))
