"""Layer time with gate/up fused (one kernel, two accumulators) against split (two launches and a
SwiGLU pass), per packed model, at the policy's tile width. GPU only."""
import torch
import triton

from moetile import benchmark as B

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
sh = B.Shape()
for model, form in (("q2", "fast"), ("q2", "compact"), ("q4", "auto")):
    w = B.make_weights(model, sh, "cuda", form=form)
    for T in (128, 512, 2048, 8192):
        ids, rw = B.make_routing("uniform", T, sh, "cuda", seed=T)
        x = torch.randn(T, sh.H, device="cuda")
        res = []
        for gu in ("fused", "split"):
            ms = B.time_ms(lambda gu=gu: B.run_layer(w, x, ids, rw, path="prefill", gate_up=gu), reps=10)
            res.append(f"{gu} {ms:7.3f} ms")
        print(f"{model}/{form} T={T:5d} | " + " | ".join(res), flush=True)
    del w
    torch.cuda.empty_cache()
