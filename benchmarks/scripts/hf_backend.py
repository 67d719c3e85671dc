"""Issue #12, item 3: moetile as transformers' experts backend on one DeepSeek-V4-Flash-sized
``DeepseekV4SparseMoeBlock`` (E=256, k=6, H=4096, F=2048, bf16 activations), against transformers'
``"grouped_mm"`` on bf16 experts and against moetile's own layer, same run, same card.

    PYTHONPATH=src python benchmarks/scripts/hf_backend.py [--reps 20] [--out DIR]
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/scripts/hf_backend.py --tiny   # CPU self-check

Times are medians of ``--reps`` CUDA-event-timed calls after warm-up (moetile.benchmark.time_ms), three
random non-zero input sets rotated, at T = 1, 8, 128, 2048 tokens. Rows:

- ``block``: the whole transformers block forward (its router, its bf16 shared expert ``DeepseekV4MLP``,
  the experts through the configured backend): "grouped_mm" on bf16 experts, then "moetile" with q4
  (Q4_K), q2 (IQ2_XXS fast gate/up + Q2_K down, ``benchmark.PRESETS["q2"]``) and q2 compact.
- ``experts``: the experts call alone, ``block.experts(x, ids, w)``, on the block router's own routing
  of the same inputs: what the backend replaces.
- ``moe_forward``: ``moe_forward(x, w, topk_ids=ids, topk_weights=w, include_shared=False,
  validate=False)`` on the very packed tensors the backend holds, same routing. This is the
  apples-to-apples reference for "the integration adds no cost": the backend calls exactly this, so
  ``experts / moe_forward`` is the integration's overhead (Python dispatch, int64->int32 ids, the
  f32->bf16 output cast). Target: <= 1.10 at every T.
- ``DS4MoE``: moetile's whole layer (its Triton router + the routed experts + a Q8_0 shared expert) on the
  same routed weights, for context against ``block``: not the same work (transformers' router is ~12
  torch ops and its shared expert runs in bf16 with cuBLAS), so ``block / DS4MoE`` shows what the rest
  of transformers' block costs, not the integration.

Expert weights are ``random_blocks`` (quantizing 256 experts would take minutes); the bf16 block holds the
dequantized q4 blocks, so "grouped_mm" and "moetile" q4 compute the same function (their relative
difference is printed). Memory: the experts' bytes (bf16 parameters; packed planes of the backend) and the
change of ``torch.cuda.memory_allocated`` when they are installed. One block at a time: the bf16 experts
(12.9 GB) are freed when the q4 blocks replace them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from moetile.benchmark import PRESETS, time_ms
from moetile.integrations import transformers as mt
from moetile.moe import DS4MoE, MoEWeights, moe_forward
from moetile.quant import random_blocks


def build_block(E, k, H, F, device):
    import transformers
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    cfg = transformers.DeepseekV4Config(
        hidden_size=H, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=k, num_hidden_layers=1,
        mlp_layer_types=["moe"], layer_types=["sliding_attention"], num_nextn_predict_layers=0)
    cfg._experts_implementation = "grouped_mm"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no f32 copy of the 12.9 GB of experts on the way
    try:
        with torch.device(device):
            block = DeepseekV4SparseMoeBlock(cfg, 0).eval()
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.02, generator=g)
        block.gate.e_score_correction_bias.uniform_(0, 0.05, generator=g)
        for lin in (block.shared_experts.gate_proj, block.shared_experts.up_proj, block.shared_experts.down_proj):
            lin.weight.normal_(0, 0.02, generator=g)
    return block


def experts_blocks(preset, E, H, F, device, seed):
    gq, dq = PRESETS[preset]
    g = torch.Generator(device=device).manual_seed(seed)
    return (random_blocks(gq, (E, F, H), g, device), random_blocks(gq, (E, F, H), g, device),
            random_blocks(dq, (E, H, F), g, device))


@torch.no_grad()
def fill_bf16(block, gate, up, down, chunk=32):
    """The bf16 experts of ``block`` := the dequantized blocks, a few experts at a time."""
    e = block.experts
    F = gate.shape[1]
    for s in range(0, gate.shape[0], chunk):
        t = min(s + chunk, gate.shape[0])
        e.gate_up_proj[s:t, :F].copy_(gate.experts(s, t).dequantize(torch.bfloat16))
        e.gate_up_proj[s:t, F:].copy_(up.experts(s, t).dequantize(torch.bfloat16))
        e.down_proj[s:t].copy_(down.experts(s, t).dequantize(torch.bfloat16))


def install(block, gate, up, down, form):
    """The backend's weights into ``block.experts`` (what quantize_experts / load_gguf_experts do after
    quantizing or reading the blocks) and the block switched to "moetile"; (packed bytes, change of
    allocated bytes: the experts it replaces are freed, description of the types)."""
    sync()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    site = mt._sites(block)[0]
    _, held, kinds = mt._install(site, mt._plan(site), gate, up, down, form)
    mt._switch(block, [site])
    sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    return held, after - before, kinds


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rotating(fns):
    it = [0]

    def call():
        fns[it[0] % len(fns)]()
        it[0] += 1

    return call


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens", default="1,8,128,2048")
    ap.add_argument("--out", type=Path, help="also write the tables to DIR/hf_backend.md")
    ap.add_argument("--tiny", action="store_true", help="E=8, H=F=256 on the CPU (a self-check, not timings)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    E, k, H, F = (8, 2, 256, 256) if args.tiny or not gpu else (256, 6, 4096, 2048)
    tokens = [int(t) for t in args.tokens.split(",")] if not args.tiny else [1, 8]
    reps, warmup = (args.reps, args.warmup) if gpu else (1, 0)
    import transformers

    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    card = torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter: NOT timings)"
    out(f"{card}; torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; "
        f"DeepseekV4SparseMoeBlock E={E} k={k} H={H} F={F}, bf16 activations; median of {reps} after {warmup} "
        f"warm-up, 3 input sets rotated")
    t0 = time.time()
    block = build_block(E, k, H, F, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    xs = {T: [torch.randn(1, T, H, device=dev, generator=g).to(torch.bfloat16) for _ in range(3)] for T in tokens}
    with torch.no_grad():
        routes = {T: [block.gate(x)[1:] for x in xs[T]] for T in tokens}  # (weights, ids) per input set
    q4 = experts_blocks("q4", E, H, F, dev, seed=2)
    fill_bf16(block, *q4)
    bf16_bytes = block.experts.gate_up_proj.nbytes + block.experts.down_proj.nbytes

    times = {}  # (row, variant) -> {T: ms}
    mem = {"grouped_mm": (bf16_bytes, None, "bf16")}
    ref_out = {}

    def time_variant(variant, ds4=None, routed_w=None):
        for T in tokens:
            ins = xs[T]
            rts = routes[T]
            with torch.no_grad():
                def blk(i):
                    return lambda: block(ins[i])

                def exp(i):
                    return lambda: block.experts(ins[i].view(T, H), rts[i][1], rts[i][0])

                times.setdefault(("block", variant), {})[T] = time_ms(rotating([blk(i) for i in range(3)]),
                                                                      warmup=warmup, reps=reps)
                times.setdefault(("experts", variant), {})[T] = time_ms(rotating([exp(i) for i in range(3)]),
                                                                        warmup=warmup, reps=reps)
                y = block.experts(ins[0].view(T, H), rts[0][1], rts[0][0])
                if variant == "grouped_mm":
                    ref_out[T] = y.float()
                elif variant == "moetile q4":
                    out(f"  check T={T}: moetile q4 experts vs grouped_mm on the same (dequantized) weights: "
                        f"relative difference {rel(y, ref_out[T]):.2e}")
                if routed_w is not None:
                    def mf(i):
                        x2 = ins[i].view(T, H)
                        return lambda: moe_forward(x2, routed_w, topk_ids=rts[i][1], topk_weights=rts[i][0],
                                                   include_shared=False, validate=False)

                    times.setdefault(("moe_forward", variant), {})[T] = time_ms(
                        rotating([mf(i) for i in range(3)]), warmup=warmup, reps=reps)
                    y2 = moe_forward(ins[0].view(T, H), routed_w, topk_ids=rts[0][1], topk_weights=rts[0][0],
                                     include_shared=False, validate=False)
                    assert rel(y, y2) < 1e-2, f"{variant} T={T}: backend and moe_forward disagree"
                if ds4 is not None:
                    def d4(i):
                        x2 = ins[i].view(T, H)
                        return lambda: ds4(x2)

                    times.setdefault(("DS4MoE", variant), {})[T] = time_ms(rotating([d4(i) for i in range(3)]),
                                                                           warmup=warmup, reps=reps)

    out(f"built the block and the weights in {time.time() - t0:.0f} s; timing grouped_mm ...")
    time_variant("grouped_mm")
    gs = torch.Generator(device=dev).manual_seed(3)
    shared = (random_blocks("Q8_0", (F, H), gs, dev), random_blocks("Q8_0", (F, H), gs, dev),
              random_blocks("Q8_0", (H, F), gs, dev))
    router = block.gate.weight.detach().float()
    bias = block.gate.e_score_correction_bias.detach().float()
    variants = [("moetile q4", "q4", "auto"), ("moetile q2", "q2", "fast"), ("moetile q2 compact", "q2", "compact")]
    blocks = {"q4": q4}
    del q4
    for variant, preset, form in variants:
        if preset not in blocks:
            blocks = {preset: experts_blocks(preset, E, H, F, dev, seed=4)}  # the previous preset's are dropped
        packed_bytes, delta, kinds = install(block, *blocks[preset], form)
        mem[variant] = (packed_bytes, delta, kinds)
        w = mt._weights(block.experts)  # the packed tensors the backend holds
        layer = DS4MoE(MoEWeights(w.gate, w.up, w.down, router=router, bias=bias, shared_gate=shared[0],
                                  shared_up=shared[1], shared_down=shared[2], top_k=k, scale=1.5, clamp=10.0))
        out(f"timing {variant} ({kinds}) ...")
        time_variant(variant, ds4=layer, routed_w=w)
        del layer, w
        sync()

    out()
    head = "| row | variant | " + " | ".join(f"T={T}" for T in tokens) + " |"
    out(head)
    out("|" + "---|" * (2 + len(tokens)))
    for (row, variant), ts in times.items():
        out(f"| {row} | {variant} | " + " | ".join(f"{ts[T]:.3f}" for T in tokens) + " |")
    out()
    out("ms per forward. Ratios at each T:")
    out(head.replace("| row | variant |", "| ratio | variant |"))
    out("|" + "---|" * (2 + len(tokens)))
    for variant, _, _ in variants:
        for name, num, den in (
                ("experts / moe_forward (target <= 1.10)", times[("experts", variant)], times[("moe_forward", variant)]),
                ("block / DS4MoE", times[("block", variant)], times[("DS4MoE", variant)]),
                ("grouped_mm block / this block", times[("block", "grouped_mm")], times[("block", variant)])):
            out(f"| {name} | {variant} | " + " | ".join(f"{num[T] / den[T]:.2f}" for T in tokens) + " |")
    out()
    out("| experts | types | bytes | vs bf16 | change of cuda allocated on install (the previous experts freed) |")
    out("|---|---|---|---|---|")
    for variant, (nbytes, delta, kinds) in mem.items():
        d = "" if delta is None else f"{delta / 1e9:+.3f} GB"
        vs = "baseline" if variant == "grouped_mm" else f"{bf16_bytes / nbytes:.2f}x less"
        out(f"| {variant} | {kinds} | {nbytes / 1e9:.3f} GB | {vs} | {d} |")
    out()
    out("median over T of experts / moe_forward: " + ", ".join(
        f"{v}: {statistics.median(times[('experts', v)][T] / times[('moe_forward', v)][T] for T in tokens):.3f}"
        for v, _, _ in variants))
    out(f"total {time.time() - t0:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hf_backend.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
