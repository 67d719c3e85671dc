"""H100 sweep of launch shapes (weight rows per program x stages) per width for IQ2_XXS, Q2_K and Q4_K,
plus the fused gate+up variant. GPU only. Run: python3 benchmarks/scripts/mm_config_sweep.py"""
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import torch
import triton

from moetile import random_blocks, schedule
from moetile.kernels.mm_id import mul_mm_id_kernel
from moetile.ops.mul_mm_id import mul_mm_id_mapped
from moetile.reference import mul_mm_id_ref
from moetile.schedule import MMConfig

dev = "cuda"
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
g = torch.Generator(device=dev).manual_seed(0)
E, k = 256, 6
cases = [("IQ2_XXS", 2048, 4096), ("Q2_K", 4096, 2048), ("Q4_K", 2048, 4096)]
res = []
for qtype, N, K in cases:
    w = random_blocks(qtype, (E, N, K), generator=g, device=dev)
    for T in [2048, 8192]:
        x = torch.randn(T, K, device=dev, generator=g).half()
        ids = torch.rand(T, E, device=dev, generator=g).topk(k, dim=1).indices.to(torch.int32)
        emap = schedule.build_expert_map(ids, E)
        # check a few pairs vs reference once per T
        sub = ids[:64]
        for width in [32, 64, 128]:
            tiles = schedule.build_tiles(emap, width)
            out = torch.full((T * k, N), float("nan"), device=dev)
            best = None
            for bn, st in itertools.product([128, 256], [2, 3, 4]):
                nw = 8 if bn * width >= 128 * 64 else 4
                cfg = MMConfig(width, bn, nw, st)
                try:
                    out.fill_(float("nan"))
                    mul_mm_id_mapped(x, w, emap, tiles, out=out, config=cfg)
                    torch.cuda.synchronize()
                    bad = out.isnan().any().item()
                    ms = triton.testing.do_bench(lambda: mul_mm_id_mapped(x, w, emap, tiles, out=out, config=cfg), warmup=5, rep=30, return_mode="median")
                except Exception as ex:
                    print("FAIL", qtype, T, width, bn, st, str(ex)[:200], flush=True); continue
                print(f"{qtype:8s} T={T:5d} w={width:3d} bn={bn} st={st} nw={nw} {ms:7.3f} ms nan={bad}", flush=True)
                res.append(dict(qtype=qtype, T=T, w=width, bn=bn, st=st, nw=nw, ms=ms, nan=bad))
        # correctness of the default path on 64 tokens
        ref = mul_mm_id_ref(x[:64], w, sub, round_f16=True)
        o = out.view(T, k, N)[:64].double()
        print("   relerr first 64 tokens:", ((o - ref).norm() / ref.norm()).item(), flush=True)
    # fused gate+up, IQ2/Q4_K only
    if N == 2048:
        T = 2048
        x = torch.randn(T, K, device=dev, generator=g).half()
        ids = torch.rand(T, E, device=dev, generator=g).topk(k, dim=1).indices.to(torch.int32)
        rw = torch.rand(T * k, device=dev, generator=g)
        emap = schedule.build_expert_map(ids, E)
        for width in [64, 128]:
            tiles = schedule.build_tiles(emap, width)
            mid = torch.empty(T * k, N, device=dev, dtype=torch.float16)
            for bn, st in itertools.product([64, 128], [2, 3]):
                nw = 8 if bn * width >= 128 * 64 else 4
                cfg = MMConfig(width, bn, nw, st)
                try:
                    f = lambda: mul_mm_id_mapped(x, w, emap, tiles, out=mid, config=cfg, w_up=w, route_weights=rw)
                    f(); torch.cuda.synchronize()
                    ms = triton.testing.do_bench(f, warmup=5, rep=30, return_mode="median")
                except Exception as ex:
                    print("FAIL fused", qtype, width, bn, st, str(ex)[:200], flush=True); continue
                print(f"FUSED {qtype:8s} T={T:5d} w={width:3d} bn={bn} st={st} nw={nw} {ms:7.3f} ms", flush=True)
    del w; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep.json"), "w"))
print("=== compiled variants")
for dc in mul_mm_id_kernel.device_caches.values():
    for key, kern in dc[0].items():
        ptx = kern.asm.get("ptx", "")
        print(str(key)[-150:].replace("\n", " "), "| wgmma", "wgmma" in ptx, "regs", kern.n_regs, "spills", kern.n_spills, "smem", kern.metadata.shared)
