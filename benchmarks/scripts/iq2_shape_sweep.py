"""IQ2_XXS gate op (T=2048, 8192) over launch shapes; run once per source tree for an A/B.
GPU only. Run: PYTHONPATH=src python3 benchmarks/scripts/iq2_shape_sweep.py"""
import itertools

import torch
import triton

from moetile import benchmark as B
from moetile import random_blocks, schedule
from moetile.ops.mul_mm_id import mul_mm_id_mapped
from moetile.schedule import MMConfig

print("src:", schedule.__file__, torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
sh = B.Shape()
g = torch.Generator(device="cuda").manual_seed(0)
w = random_blocks("IQ2_XXS", (256, 2048, 4096), g, "cuda")
for T in (2048, 8192):
    ids, _ = B.make_routing("uniform", T, sh, "cuda", seed=T)
    emap = schedule.build_expert_map(ids, 256)
    x = torch.randn(T, 4096, device="cuda").half()
    out = torch.empty(T * 6, 2048, device="cuda")
    for width in (64, 128):
        tiles = schedule.build_tiles(emap, width)
        for bn, st in itertools.product((128, 256), (2, 3)):
            cfg = MMConfig(width, bn, 8, st)
            try:
                ms = B.time_ms(lambda: mul_mm_id_mapped(x, w, emap, tiles, out=out, config=cfg), reps=10)
            except Exception as ex:
                print("FAIL", T, width, bn, st, str(ex)[:100]); continue
            print(f"IQ2 T={T} w={width} bn={bn} st={st} {ms:.3f} ms", flush=True)
