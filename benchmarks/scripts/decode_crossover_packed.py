"""Layer time (routing given, no shared expert) of the decode mat-vec path against the tiled path at
small T, per packed model. GPU only. Run: python3 benchmarks/scripts/decode_crossover_packed.py"""
import torch
import triton

from moetile import benchmark as B

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
sh = B.Shape()
for model, form in (("q2", "fast"), ("q2", "compact"), ("q4", "auto")):
    w = B.make_weights(model, sh, "cuda", form=form)
    for T in (1, 2, 4, 8, 16, 32, 64):
        ids, rw = B.make_routing("uniform", T, sh, "cuda", seed=T)
        x = torch.randn(T, sh.H, device="cuda")
        res = []
        for name, plan in [("decode", dict(path="decode")), ("w16", dict(path="prefill", tile=16)),
                           ("w32", dict(path="prefill", tile=32))]:
            ms = B.time_ms(lambda plan=plan: B.run_layer(w, x, ids, rw, **plan), reps=30)
            res.append(f"{name} {ms * 1e3:8.1f} us")
        print(f"{model}/{form} T={T:3d} | " + " | ".join(res), flush=True)
    del w
    torch.cuda.empty_cache()
