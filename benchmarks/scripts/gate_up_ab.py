"""Layer time with gate/up fused (one kernel, two accumulators) against split (two launches and a
SwiGLU pass), per packed model, at the policy's tile width (or the width given as argument). GPU
only. Run: python3 benchmarks/scripts/gate_up_ab.py [WIDTH]"""
import sys

import torch
import triton

from moetile import benchmark as B

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
sh = B.Shape()
tile = int(sys.argv[1]) if len(sys.argv) > 1 else "auto"
Ts = (2048, 8192) if tile != "auto" else (128, 512, 2048, 8192)
for model, form in (("q2", "fast"), ("q2", "compact"), ("q4", "auto")):
    w = B.make_weights(model, sh, "cuda", form=form)
    for T in Ts:
        ids, rw = B.make_routing("uniform", T, sh, "cuda", seed=T)
        x = torch.randn(T, sh.H, device="cuda")
        res = []
        for gu in ("fused", "split"):
            ms = B.time_ms(lambda gu=gu: B.run_layer(w, x, ids, rw, path="prefill", gate_up=gu, tile=tile), reps=10)
            res.append(f"{gu} {ms:7.3f} ms")
        print(f"{model}/{form} T={T:5d} tile={tile} | " + " | ".join(res), flush=True)
    del w
    torch.cuda.empty_cache()
