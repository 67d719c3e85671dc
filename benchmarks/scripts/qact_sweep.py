"""The integer (two-level int8 activation) decode mat-vec against the float32 one, on the GPU.

A: correctness at DS4-like shapes: PTX vs plain-tl decoders bit for bit, both vs float64 on the
   quantized activations, and vs x. B: one decode step's routed matmuls (quantize x, fused gate+up,
   quantize mid, down; T=1 and 8, k=6, DS4 shapes) and the shared expert (Q8_0, E=1), GPU time per
   step from CUDA graphs of 20 steps, over launch shapes and split targets.
Run: python3 benchmarks/scripts/qact_sweep.py
"""
import itertools
import sys

import torch
import triton

from moetile import benchmark as B
from moetile import schedule
from moetile.ops._checks import ids_int32
from moetile.ops.act_quant import act_layout, quantize_act
from moetile.ops.mul_mv_id import launch_mv
from moetile.quant import random_blocks
from moetile.quant.pack import packed
from moetile.reference import act_dequant_ref, act_quant_ref, mul_mm_id_ref

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)

# ---- A: correctness
E, N, K, T, k = 8, 256, 4096, 3, 4
for qt, form in (("IQ2_XXS", "fast"), ("IQ2_XXS", "compact"), ("Q4_K", "auto"), ("Q2_K", "auto"), ("Q8_0", "auto")):
    w = packed(random_blocks(qt, (E, N, K), g, dev), form)
    x = torch.randn(T, K, device=dev, generator=g) * torch.rand(T, K, device=dev, generator=g).pow(3) * 4
    ids = torch.randint(0, E, (T, k), device=dev, generator=g).int()
    q = quantize_act(x, act_layout(w))
    wr, sr, sur = act_quant_ref(x, q.layout)
    xh = act_dequant_ref(q.words, q.scales, q.layout)
    rel = ((xh - x.double()).abs().reshape(T, -1, 32).amax(-1) / x.abs().reshape(T, -1, 32).amax(-1).double()).max()
    outs = []
    for asm in (True, False):
        out = torch.full((T * k, N), float("nan"), device=dev)
        launch_mv(x, w, ids.reshape(-1), k, out, act=q, config=schedule.MVConfig(16, 256, 2, asm=asm), split=False)
        outs.append(out)
    ref = mul_mm_id_ref(xh, w, ids).reshape(T * k, N)
    ref0 = mul_mm_id_ref(x, w, ids).reshape(T * k, N)
    e = ((outs[0].double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    e0 = ((outs[0].double() - ref0).norm(dim=1) / ref0.norm(dim=1)).max().item()
    print(f"A {qt}/{form}: asm==tl {torch.equal(outs[0], outs[1])} nan {outs[0].isnan().sum().item()}  "
          f"vs xhat {e:.2e} vs x {e0:.2e}  quant==ref words {(q.words == wr).float().mean().item():.4f} "
          f"scales {(q.scales == sr).float().mean().item():.4f} sums {(q.sums == sur).float().mean().item():.4f} "
          f"|x-xhat|/amax {rel:.2e}", flush=True)


# ---- B: timing
def graph_ms(step):
    return B.graph_ms(step, reps=30)


sh = B.Shape()
shapes = [(bn, bk, nw) for bn, bk, nw in itertools.product((16, 32), (256, 512, 1024), (2, 4))]
for model, form in (("q2", "fast"), ("q4", "auto"), ("q2", "compact"), ("shared", "auto")):
    if model == "shared":
        qt = "Q8_0"
        wg = packed(random_blocks(qt, (1, 2048, sh.H), g, dev))
        wu = packed(random_blocks(qt, (1, 2048, sh.H), g, dev))
        wd = packed(random_blocks(qt, (1, sh.H, 2048), g, dev))
        kk, Ts = 1, (1, 8)
    else:
        w = B.make_weights(model, sh, dev, form=form)
        wg, wu, wd = w.gate, w.up, w.down
        kk, Ts = sh.k, (1, 8)
    F = wg.shape[1]
    for T in Ts:
        if model == "shared":
            ids = torch.zeros(T, 1, dtype=torch.int32, device=dev)
            rw = torch.ones(T, 1, device=dev)
        else:
            ids, rw = B.make_routing("uniform", T, sh, dev, seed=1)
        ids32 = ids_int32(ids, wg.shape[0])
        P = T * kk
        x = torch.randn(T, sh.H, device=dev)
        mid = torch.empty(P, F, device=dev)
        y = torch.empty(P, sh.H, device=dev)
        rwf = rw.reshape(-1).float()

        def f32_step(cfg=None):
            launch_mv(x, wg, ids32, kk, mid, w_up=wu, route_weights=rwf, config=cfg)
            launch_mv(mid.view(T, kk, F), wd, ids32, kk, y, config=cfg)

        def q_step(cfg):
            qx = quantize_act(x, act_layout(wg))
            launch_mv(x, wg, ids32, kk, mid, w_up=wu, route_weights=rwf, config=cfg, act=qx)
            qm = quantize_act(mid, act_layout(wd))
            launch_mv(mid.view(T, kk, F), wd, ids32, kk, y, config=cfg, act=qm)

        base = graph_ms(f32_step)
        f32_step()
        yref = y.clone()
        res = []
        for mp in (512,):
            schedule.MV_MIN_PROGRAMS = mp
            for bn, bk, nw in shapes:
                cfg = schedule.MVConfig(bn, bk, nw)
                try:
                    ms = graph_ms(lambda cfg=cfg: q_step(cfg))
                except Exception as ex:  # noqa: BLE001
                    print(f"B {model}/{form} T={T} {cfg} split>={mp}: {type(ex).__name__} {str(ex)[:200]}", flush=True)
                    continue
                q_step(cfg)
                err = ((y.double() - yref.double()).norm(dim=1) / yref.double().norm(dim=1)).max().item()
                res.append((ms, bn, bk, nw, mp, err))
        schedule.MV_MIN_PROGRAMS = 512
        res.sort()
        qx_ms = graph_ms(lambda: quantize_act(x, act_layout(wg)))
        qm_ms = graph_ms(lambda: quantize_act(mid, act_layout(wd)))
        print(f"B {model}/{form} T={T}: f32 policy {base * 1e3:.1f} us; quantize x {qx_ms * 1e3:.1f} mid {qm_ms * 1e3:.1f} us; "
              f"q8x2 best: " + ", ".join(f"({bn},{bk},{nw},{mp}) {ms * 1e3:.1f} us err {er:.1e}"
                                         for ms, bn, bk, nw, mp, er in res[:6]), flush=True)
        print(f"B {model}/{form} T={T} all: " + " ".join(f"{bn}/{bk}/{nw}/{mp}:{ms * 1e3:.1f}"
                                                         for ms, bn, bk, nw, mp, er in sorted(res, key=lambda r: r[1:5])),
              flush=True)
sys.stdout.flush()
