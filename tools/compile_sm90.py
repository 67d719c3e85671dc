"""Compile every kernel variant with the PTX decoders on (the GPU path) for sm_90, without a GPU:
Triton's own ptxas checks the inline PTX, the types of every branch and the resources, so a
decoder that only the GPU would run cannot break unseen in CI. Prints one line per failure.

    python3 tools/compile_sm90.py        # exit 1 on any failure; must run without TRITON_INTERPRET
"""

from __future__ import annotations

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/compile_sm90.py compiles for the GPU: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moetile import schedule  # noqa: E402
from moetile.kernels.act_quant import act_quant_kernel  # noqa: E402
from moetile.kernels.mm_id import mul_mm_id_kernel  # noqa: E402
from moetile.kernels.mv_id import mul_mv_id_kernel, mv_reduce_kernel  # noqa: E402
from moetile.kernels.router import route_select_kernel, router_logits_kernel  # noqa: E402

# form id -> (policy key, plane pointer types in ops/_launch.kernel_planes views)
FORMS = {12: ("Q4_K", ("*i32", "*i16", "*i32")), 10: ("Q2_K", ("*i16", "*u8", "*i32")),
         16: ("IQ2_XXS/fast", ("*i32", "*u8", "*fp16")), 17: ("IQ2_XXS/compact", ("*u8", "*i32", "*fp16")),
         8: ("Q8_0", ("*i32", "*fp16", "*fp16"))}
INTS = {"N", "K", "K_CHUNK", "rhs_stride", "TOPK", "NUM_EXPERTS"}


def _compile(fn, sig, consts, warps, stages):
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or n in {"N", "K", "rhs_stride", "NUM_EXPERTS"}}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=attrs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def _planes(p):
    return {"w0": p[0], "w1": p[1], "w2": p[2], "u0": p[0], "u1": p[1], "u2": p[2], "tables_ptr": "*i32"}


def variants():
    """(name, thunk) for every mm shape the policy picks (per form, width, fused), the mat-vec and the
    deterministic router."""
    cfg = schedule.router_config(4096, interpreter=False)
    for x_t in ("*fp32", "*bf16", "*fp16"):
        sig = {"x_ptr": x_t, "w_ptr": "*fp16", "part_ptr": "*fp32", "T": "i32", "E": "i32", "H": "i32",
               "H_CHUNK": "i32"}
        consts = dict(BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e, BLOCK_K=cfg.block_k)
        yield (f"router_logits x={x_t}",
               lambda s=sig, c=consts: _compile(router_logits_kernel, s, c, cfg.num_warps, cfg.num_stages))
    for hashed in (False, True):
        sig = {"part_ptr": "*fp32", "bias_ptr": "*fp32", "tok_ptr": "*i32", "table_ptr": "*i32", "ids_ptr": "*i32",
               "wts_ptr": "*fp32", "T": "i32", "E": "i32", "V": "i32", "S": "i32", "scale": "fp32"}
        consts = dict(TOPK=6, HAS_BIAS=not hashed, HASH=hashed, BLOCK_T=cfg.select_t, BLOCK_E=256, BLOCK_K=8)
        yield (f"route_select hash={hashed}",
               lambda s=sig, c=consts: _compile(route_select_kernel, s, c, cfg.select_warps, 2))
    for form, (key, p) in FORMS.items():
        for width in schedule.WIDTHS:
            for fused in (False, True):
                cfg = schedule.mm_config(width, 4096, key, fused=fused)
                sig = {**_planes(p), "rhs_ptr": "*fp16", "route_w_ptr": "*fp32",
                       "out_ptr": "*fp16" if fused else "*fp32", "sorted_pairs_ptr": "*i32", "offsets_ptr": "*i32",
                       "tile_expert_ptr": "*i32", "tile_row_ptr": "*i32", **{n: "i32" for n in sorted(INTS)}}
                sig = {k: sig[k] for k in mul_mm_id_kernel.arg_names if k in sig}
                consts = dict(FORM=form, ASM=True, RHS_PER_PAIR=not fused, FUSE_SWIGLU=fused, CLAMP=10.0,
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
                yield (f"mul_mm_id {key} w={width} fused={fused}",
                       lambda s=sig, c=consts, g=cfg: _compile(mul_mm_id_kernel, s, c, g.num_warps, g.num_stages))
        for fused, split, act in itertools.product((False, True), (False, True), schedule.MV_ACTS):
            cfg = schedule.mv_config(interpreter=False, act=act, fused=fused)
            q = act == "q8x2"
            planes = ("*i32",) + p[1:] if q and key == "Q2_K" else p  # 16 codes per int32 word
            sig = {**_planes(planes), "rhs_ptr": "*fp32", "ids_ptr": "*i32", "route_w_ptr": "*fp32",
                   "out_ptr": "*fp32", "part_ptr": "*fp32", "part2_ptr": "*fp32", "qa_ptr": "*i32", "qs_ptr": "*fp32",
                   "qsum_ptr": "*i32", **{n: "i32" for n in sorted(INTS)}}
            sig = {k: sig[k] for k in mul_mv_id_kernel.arg_names if k in sig}
            consts = dict(FORM=form, ASM=cfg.asm, RHS_PER_PAIR=not fused, FUSE_SWIGLU=fused, CLAMP=10.0,
                          SPLIT=split, QACT=q, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
            yield (f"mul_mv_id {key} fused={fused} split={split} act={act}",
                   lambda s=sig, c=consts, g=cfg: _compile(mul_mv_id_kernel, s, c, g.num_warps, 2))
    for layout, x_t in itertools.product((0, 1, 2), ("*fp32", "*bf16", "*fp16")):
        sig = {"x_ptr": x_t, "qa_ptr": "*i32", "qs_ptr": "*fp32", "qsum_ptr": "*i32", "NB": "i32", "x_stride": "i32"}
        yield (f"act_quant layout={layout} x={x_t}",
               lambda s=sig, c=dict(LAYOUT=layout, BLOCK_B=4): _compile(act_quant_kernel, s, c, 4, 2))
    for fused in (False, True):
        sig = {"part_ptr": "*fp32", "part2_ptr": "*fp32", "route_w_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32",
               "N": "i32", "S": "i32"}
        yield (f"mv_reduce fused={fused}", lambda s=sig, f=fused: _compile(
            mv_reduce_kernel, s, dict(FUSE_SWIGLU=f, CLAMP=10.0, BLOCK=1024), 4, 2))


def main() -> int:
    failed = 0
    for name, build in variants():
        try:
            build()
        except Exception as e:  # report every variant, not just the first
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
    print(f"compiled for sm_90: {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
