"""Small elementwise kernels of the MoE layer: SwiGLU with route weight, and the slot sum.

Letters: P = T*k pairs, F expert FFN width, H hidden size.
"""

import triton
import triton.language as tl


@triton.jit
def swiglu_clamped(g, u, w, CLAMP: tl.constexpr):
    """silu(min(g, C)) * clamp(u, -C, C) * w, float32 (ds4: gate clamped above only, up both ways,
    the route weight before down). NaN stays NaN: a token's NaN must not become a finite +-C."""
    g = tl.minimum(g, CLAMP, propagate_nan=tl.PropagateNan.ALL)
    u = tl.minimum(tl.maximum(u, -CLAMP, propagate_nan=tl.PropagateNan.ALL), CLAMP,
                   propagate_nan=tl.PropagateNan.ALL)
    return g / (1.0 + tl.exp(-g)) * u * w


@triton.jit
def swiglu_weight_kernel(g_ptr, u_ptr, w_ptr, mid_ptr, ids_ptr, counts_ptr, F, num_experts, min_rows,
                         CLAMP: tl.constexpr, SELECT: tl.constexpr, BLOCK: tl.constexpr):
    """mid[p, :] = silu(min(g, C)) * clamp(u, -C, C) * w[p], f32 in, f16 out; grid (P, cdiv(F, BLOCK)).
    With SELECT only the pairs whose expert ids[p] (int32 [P]) is valid and holds at least
    ``min_rows`` pairs (counts int32 [E+1]) are written: the wide class of a two-width plan."""
    p = tl.program_id(0).to(tl.int64)
    if SELECT:
        e = tl.load(ids_ptr + p)
        if (e < 0) | (e >= num_experts):
            return
        if tl.load(counts_ptr + e) < min_rows:
            return
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = f < F
    g = tl.load(g_ptr + p * F + f, mask=ok, other=0.0)
    u = tl.load(u_ptr + p * F + f, mask=ok, other=0.0)
    tl.store(mid_ptr + p * F + f, swiglu_clamped(g, u, tl.load(w_ptr + p), CLAMP).to(tl.float16), mask=ok)


@triton.jit
def combine_slots_kernel(y_ptr, add_ptr, rows_ptr, out_ptr, H, TOPK: tl.constexpr, HAS_ADD: tl.constexpr,
                         HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = ((y[r(t,0)] + y[r(t,1)]) + ... + y[r(t,k-1)]) (+ add[t]): fixed slot order, no atomics,
    so the sum is deterministic. y f32 [T*k, H] with r(t, s) = t*k + s, or with HAS_ROWS
    r(t, s) = rows[t*k + s] (int64 [T*k]: where a pair's row landed); grid (T, cdiv(H, BLOCK))."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = h < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(TOPK):
        r = t * TOPK + s
        if HAS_ROWS:
            r = tl.load(rows_ptr + r)
        if s == 0:
            acc = tl.load(y_ptr + r * H + h, mask=ok, other=0.0)
        else:
            acc += tl.load(y_ptr + r * H + h, mask=ok, other=0.0)
    if HAS_ADD:
        acc += tl.load(add_ptr + t * H + h, mask=ok, other=0.0)
    tl.store(out_ptr + t * H + h, acc, mask=ok)
