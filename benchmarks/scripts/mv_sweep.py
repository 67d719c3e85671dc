"""Sweep the decode mat-vec shape (rows per program, weights per K step, warps) on the GPU: time of
one decode step's routed matmuls (fused gate+up, then down) at T=1, k=6, DS4 shapes, per packed
model. Run: python3 benchmarks/scripts/mv_sweep.py"""
import itertools

import torch
import triton

from moetile import benchmark as B
from moetile import schedule
from moetile.ops._checks import ids_int32
from moetile.ops.mul_mv_id import launch_mv

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
sh = B.Shape()
for model, form in (("q2", "fast"), ("q2", "compact"), ("q4", "auto")):
    w = B.make_weights(model, sh, "cuda", form=form)
    ids, rw = B.make_routing("uniform", 1, sh, "cuda", seed=1)
    ids32 = ids_int32(ids, sh.E)
    x = torch.randn(1, sh.H, device="cuda")
    mid = torch.empty(sh.k, sh.F, device="cuda")
    y = torch.empty(sh.k, sh.H, device="cuda")
    res = []
    for bn, bk, nw in itertools.product((8, 16, 32), (64, 128, 256), (1, 2, 4)):
        cfg = schedule.MVConfig(bn, bk, nw)

        def step(cfg=cfg):
            launch_mv(x, w.gate, ids32, sh.k, mid, w_up=w.up, route_weights=rw.reshape(-1), config=cfg)
            launch_mv(mid.view(1, sh.k, sh.F), w.down, ids32, sh.k, y, config=cfg)

        try:
            ms = B.time_ms(step, reps=50)
        except Exception as e:
            print(f"{model}/{form} {cfg}: {type(e).__name__} {str(e)[:80]}", flush=True)
            continue
        res.append((ms, bn, bk, nw))
    res.sort()
    print(f"{model}/{form}: best " + ", ".join(f"({bn},{bk},{nw}) {ms * 1e3:.1f} us" for ms, bn, bk, nw in res[:5]))
    cur = [r for r in res if (r[1], r[2], r[3]) == (16, 256, 2)]
    print(f"{model}/{form}: current (16,256,2) {cur[0][0] * 1e3:.1f} us" if cur else "", flush=True)
    del w
    torch.cuda.empty_cache()
