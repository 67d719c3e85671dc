"""Correctness and time of decode mat-vec shapes (rows, K step, warps, PTX or twin decoders) at DS4
shapes, T=1 and T=4: each against the float64 reference on the sampled pairs. GPU only."""
import torch

from moetile import benchmark as B
from moetile import schedule
from moetile.ops._checks import ids_int32
from moetile.ops.mul_mv_id import launch_mv
from moetile.reference import mul_mm_id_ref

sh = B.Shape()
CFGS = [(8, 128, 1, True), (8, 256, 2, True), (8, 256, 4, True), (16, 256, 2, True), (16, 128, 2, True),
        (16, 256, 4, True), (8, 256, 2, False), (16, 256, 2, False)]
for model, form in (("q2", "fast"), ("q2", "compact"), ("q4", "auto")):
    w = B.make_weights(model, sh, "cuda", form=form)
    for T in (1, 4):
        ids, _ = B.make_routing("uniform", T, sh, "cuda", seed=T)
        ids32 = ids_int32(ids, sh.E)
        x = torch.randn(T, sh.H, device="cuda")
        ref = mul_mm_id_ref(x, w.gate, ids).reshape(T * sh.k, sh.F)
        line = []
        for bn, bk, nw, asm in CFGS:
            cfg = schedule.MVConfig(bn, bk, nw, asm)
            out = torch.full((T * sh.k, sh.F), float("nan"), device="cuda")
            launch_mv(x, w.gate, ids32, sh.k, out, config=cfg)
            err = ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
            ms = B.time_ms(lambda cfg=cfg, out=out: launch_mv(x, w.gate, ids32, sh.k, out, config=cfg), reps=30)
            line.append(f"({bn},{bk},{nw},{'asm' if asm else 'twin'}) err {err:.1e} {ms * 1e3:.0f}us")
        print(f"{model}/{form} T={T}: " + " | ".join(line), flush=True)
    del w
    torch.cuda.empty_cache()
