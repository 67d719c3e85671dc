"""The q8x2 decode mat-vec per op: fused gate+up and down each alone (activations quantized ahead), DS4
shapes, T = 1 and 8 (k = 6; the shared Q8_0 expert with E = 1), GPU time per call from CUDA graphs of
20 calls, over launch shapes (rows, K step, warps; split target 512); each shape's output checked
against the policy's (relative row error: a line names the shapes that differ by 1e-5 or more). The
policy's shape per op: schedule.mv_config. (The run of BENCHMARKS.md §13 had a fourth axis, Triton's
pipelining of the K loop, since removed.) Run: python3 benchmarks/scripts/mv_op_sweep.py"""
import itertools

import torch
import triton

from moetile import benchmark as B
from moetile import schedule
from moetile.ops._checks import ids_int32
from moetile.ops.act_quant import act_layout, quantize_act
from moetile.ops.mul_mv_id import launch_mv
from moetile.quant import random_blocks
from moetile.quant.pack import packed

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)


sh = B.Shape()
shapes = list(itertools.product((16, 32), (256, 512), (2, 4)))
splits = (512,)
CASES = (("q2", "fast", (1, 8)), ("q4", "auto", (1, 8)), ("q2", "compact", (8,)), ("shared", "auto", (1,)))
for model, form, Ts in CASES:
    if model == "shared":
        wg = packed(random_blocks("Q8_0", (1, 2048, sh.H), g, dev))
        wu = packed(random_blocks("Q8_0", (1, 2048, sh.H), g, dev))
        wd = packed(random_blocks("Q8_0", (1, sh.H, 2048), g, dev))
        kk = 1
    else:
        w = B.make_weights(model, sh, dev, form=form)
        wg, wu, wd = w.gate, w.up, w.down
        kk = sh.k
    F = wg.shape[1]
    for T in Ts:
        if model == "shared":
            ids = torch.zeros(T, 1, dtype=torch.int32, device=dev)
            rw = torch.ones(T, 1, device=dev)
        else:
            ids, rw = B.make_routing("uniform", T, sh, dev, seed=1)
        ids32 = ids_int32(ids, wg.shape[0])
        P = T * kk
        x = torch.randn(T, sh.H, device=dev, generator=g)
        mid = torch.empty(P, F, device=dev)
        y = torch.empty(P, sh.H, device=dev)
        rwf = rw.reshape(-1).float().contiguous()
        qx = quantize_act(x, act_layout(wg))
        launch_mv(x, wg, ids32, kk, mid, w_up=wu, route_weights=rwf, act=qx)
        qm = quantize_act(mid, act_layout(wd))
        ops = {  # used within this iteration only
            "gate_up": (lambda cfg: launch_mv(x, wg, ids32, kk, mid, w_up=wu, route_weights=rwf,  # noqa: B023
                                              config=cfg, act=qx), mid),  # noqa: B023
            "down": (lambda cfg: launch_mv(mid.view(T, kk, F), wd, ids32, kk, y, config=cfg, act=qm), y),  # noqa: B023
        }
        for op, (fn, out) in ops.items():
            policy = schedule.mv_config(False, "q8x2", fused=op == "gate_up")
            fn(policy)
            ref = out.clone().double()
            base = B.graph_ms(lambda fn=fn, p=policy: fn(p), rounds=2)
            res = []
            for mp in splits:
                schedule.MV_MIN_PROGRAMS = mp
                for bn, bk, nw in shapes:
                    cfg = schedule.MVConfig(bn, bk, nw)
                    try:
                        out.fill_(float("nan"))
                        fn(cfg)
                        err = ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
                        ms = B.graph_ms(lambda fn=fn, cfg=cfg: fn(cfg), rounds=2)
                    except Exception as ex:  # noqa: BLE001
                        print(f"  {model}/{form} T={T} {op} {cfg} split>={mp}: {type(ex).__name__} {str(ex)[:120]}")
                        continue
                    res.append((ms, bn, bk, nw, err))
            schedule.MV_MIN_PROGRAMS = 512
            res.sort()
            bad = [r for r in res if not r[4] < 1e-5]
            print(f"{model}/{form} T={T} {op}: policy {policy.block_n}/{policy.block_k}/{policy.num_warps} "
                  f"{base * 1e3:.1f} us; best " + ", ".join(f"{bn}/{bk}/{nw} {ms * 1e3:.1f}"
                                                           for ms, bn, bk, nw, er in res[:5] if er < 1e-5)
                  + (f"; {len(bad)} shapes differ (max err {max(r[4] for r in bad):.1e})" if bad else ""), flush=True)
            print("   all: " + " ".join(f"{bn}/{bk}/{nw}:{ms * 1e3:.1f}"
                                         for ms, bn, bk, nw, er in sorted(res, key=lambda r: r[1:4])), flush=True)
