"""Compile the grouped-matmul kernel for sm_90 (no GPU needed: Triton's own ptxas and cuobjdump) at the
launch shapes the policy picks, and report the main loop: SASS instructions per decoded weight
(instructions of the largest loop body / weights each thread decodes per iteration), registers,
spill stack and shared memory.

    python3 benchmarks/scripts/sass_report.py [SRC_DIR] > report.json

SRC_DIR: the tree to import moetile from (default ./src); run it once on this tree and once on the
tree before the packed forms (git archive ebe10f9 src) to get the before/after table. Needs the
Triton version the GPU runs (3.6 here), since the SASS depends on it.
"""

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "src")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moetile import schedule  # noqa: E402
from moetile.kernels.mm_id import mul_mm_id_kernel  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
OLD = "row_bytes" in mul_mm_id_kernel.arg_names  # the GGUF-byte kernel of ebe10f9
# (name, qtype/form key, form id, plane pointer types, per-pair rhs)
OPS = [("IQ2_XXS fast gate", "IQ2_XXS/fast", 16, ("*i32", "*u8", "*fp16"), False),
       ("IQ2_XXS compact gate", "IQ2_XXS/compact", 17, ("*u8", "*i32", "*fp16"), False),
       ("Q2_K down", "Q2_K", 10, ("*i16", "*u8", "*i32"), True),
       ("Q4_K gate", "Q4_K", 12, ("*i32", "*i16", "*i32"), False),
       ("Q8_0 gate", "Q8_0", 8, ("*i32", "*fp16", "*fp16"), False)]
OLD_IDS = {"IQ2_XXS": 16, "Q2_K": 10, "Q4_K": 12, "Q8_0": 8}


def _compile(qkey, form_id, ptypes, per_pair, width, fused=False):
    if OLD:
        qtype = qkey.split("/")[0]
        cfg = schedule.mm_config(width, 4096, qtype, fused=fused)
        sig = {"w_ptr": "*u8", "w2_ptr": "*u8", "table_ptr": "*i32"}
        consts = dict(QTYPE=OLD_IDS[qtype], RHS_PER_PAIR=per_pair, FUSE_SWIGLU=fused, CLAMP=10.0,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        ints = ["N", "K", "row_bytes", "expert_bytes", "rhs_stride", "TOPK", "NUM_EXPERTS"]
        block_k = 32
    else:
        cfg = schedule.mm_config(width, 4096, qkey, fused=fused)
        sig = {"w0": ptypes[0], "w1": ptypes[1], "w2": ptypes[2], "u0": ptypes[0], "u1": ptypes[1],
               "u2": ptypes[2], "tables_ptr": "*i32"}
        consts = dict(FORM=form_id, ASM=True, RHS_PER_PAIR=per_pair, FUSE_SWIGLU=fused, CLAMP=10.0,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
        ints = ["N", "K", "rhs_stride", "TOPK", "NUM_EXPERTS"]
        block_k = cfg.block_k
    sig.update({"rhs_ptr": "*fp16", "route_w_ptr": "*fp32", "out_ptr": "*fp16" if fused else "*fp32",
                "sorted_pairs_ptr": "*i32", "offsets_ptr": "*i32", "tile_expert_ptr": "*i32", "tile_row_ptr": "*i32"})
    sig.update({n: "i32" for n in ints})
    sig.update({k: "constexpr" for k in consts})
    div16 = {"N", "K", "rhs_stride", "row_bytes", "expert_bytes", "NUM_EXPERTS"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or n in div16}
    src = ASTSource(fn=mul_mm_id_kernel, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return k, cfg, block_k


def _sass_and_resources(k):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        path = f.name
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    os.unlink(path)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", res, re.S)
    return sass, dict(regs=int(m.group(1)), spill_stack=int(m.group(2)))


def _loop(sass):
    """(instructions, opcode counts) of the largest loop body: the range of a backward branch."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for a, t in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            loops.append((a - int(m.group(1), 16), int(m.group(1), 16), a))
    _, lo, hi = max(loops)
    body = [t for a, t in ins if lo <= a <= hi]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    return len(body), ops


def main():
    rows = []
    for name, qkey, form_id, ptypes, per_pair in OPS:
        if OLD and "compact" in name:
            continue
        for width in (16, 64, 128, 256):
            if width not in schedule.WIDTHS:
                continue
            k, cfg, block_k = _compile(qkey, form_id, ptypes, per_pair, width)
            sass, res = _sass_and_resources(k)
            n, ops = _loop(sass)
            per_thread = cfg.block_n * block_k / (32 * cfg.num_warps)  # weights each thread decodes per iteration
            rows.append(dict(op=name, width=width, block_n=cfg.block_n, block_k=block_k, warps=cfg.num_warps,
                             stages=cfg.num_stages, loop_instr=n, instr_per_weight=round(n / per_thread, 2),
                             shared_kb=k.metadata.shared // 1024, hgmma=ops.get("HGMMA", 0),
                             bar=ops.get("BAR", 0), **res))
            print(json.dumps(rows[-1]), file=sys.stderr)
    json.dump(dict(triton=triton.__version__, tree="ebe10f9 (GGUF bytes)" if OLD else "packed", rows=rows),
              sys.stdout, indent=1)


if __name__ == "__main__":
    main()
