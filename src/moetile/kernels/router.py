"""Router logits, float32-accurate, with a fixed reduction order (batch-invariant).

Letters: T tokens, H hidden size, E routed experts.
"""

import triton
import triton.language as tl


@triton.jit
def router_logits_kernel(
    x_ptr,  # f32/bf16/f16 [T, H], rows contiguous
    w_ptr,  # f16/bf16/f32 [E, H], rows contiguous
    out_ptr,  # f32 [T, E] out
    T,
    E,
    H,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[t, e] = sum_h x[t, h] * w[e, h] in float32, H walked in BLOCK_K steps in order; grid
    (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E)). The tensor cores compute it as 3xTF32 (x and w split into
    a TF32 high part and a TF32 remainder, three products): an f16 router is exact in TF32, and the
    result was closer to float64 than cuBLAS's float32 SGEMM on the H100 (BENCHMARKS.md). No split
    over H and a block shape that does not depend on T: a token's logits are the same bits whatever
    else is in the batch and wherever the token sits in it."""
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    t_ok = rt < T
    e_ok = re < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = k0 + kk < H
        a = tl.load(x_ptr + rt[:, None] * H + (k0 + kk)[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + re[None, :].to(tl.int64) * H + (k0 + kk)[:, None], mask=k_ok[:, None] & e_ok[None, :],
                    other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")  # [BLOCK_T, BLOCK_E]
    tl.store(out_ptr + rt[:, None] * E + re[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])
