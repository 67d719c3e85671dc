"""Why bench-ops and the sweep disagree on gate ops: time one op with f32 and f16 activations, before and after
the bf16 baseline's 4 GB allocation (GPU only)."""
import torch, triton
from functools import partial
from moetile import benchmark as B, schedule
from moetile.ops.mul_mm_id import mul_mm_id_mapped
from moetile.quant import random_blocks
from moetile.quant.pack import pack
sh = B.Shape()
g = torch.Generator(device="cuda").manual_seed(0)
for name, form in (("IQ2_XXS", "fast"), ("Q4_K", "auto")):
    w = pack(random_blocks(name, (sh.E, sh.F, sh.H), g, "cuda"), form)
    T = 2048
    ids, _ = B.make_routing("uniform", T, sh, "cuda", seed=T)
    emap = schedule.build_expert_map(ids, sh.E)
    tiles = schedule.build_tiles(emap, 64)
    out = torch.empty(T * sh.k, sh.F, device="cuda")
    x32 = torch.randn(T, sh.H, device="cuda"); x16 = x32.half()
    for rep in range(2):
        for nm, x in (("f32 x", x32), ("f16 x", x16)):
            ms = B.time_ms(partial(mul_mm_id_mapped, x, w, emap, tiles, out=out), reps=20)
            print(name, form, nm, f"{ms:.3f} ms", flush=True)
    wbf = B.dequantize_bf16(w)
    for nm, x in (("f32 x after bf16 alloc", x32), ("f16 x after bf16 alloc", x16)):
        ms = B.time_ms(partial(mul_mm_id_mapped, x, w, emap, tiles, out=out), reps=20)
        print(name, form, nm, f"{ms:.3f} ms", flush=True)
    del wbf, w; torch.cuda.empty_cache()
