"""The ds4 router in two launches: float32-accurate logits in fixed H chunks, then one kernel for
the chunk sum, sqrt(softplus) scores, top-k (or hash-table) selection and route weights.

Letters: T tokens, H hidden size, E routed experts, k experts per token, S H-chunks, V hash rows.
Rules (ties, NaN, floor, slot order): moetile.routing's docstring; these kernels follow them.
Every reduction has a fixed order and a block shape that does not depend on T, so a token's ids
and weights are the same bits whatever else is in the batch and wherever the token sits in it.
"""

import triton
import triton.language as tl

SOFTPLUS_HIGH = tl.constexpr(20.0)
SOFTPLUS_LOW = tl.constexpr(-20.0)
WEIGHT_FLOOR = tl.constexpr(6.103515625e-05)  # 2^-14


@triton.jit
def router_logits_kernel(
    x_ptr,  # f32/bf16/f16 [T, H], rows contiguous
    w_ptr,  # f16/bf16/f32 [E, H], rows contiguous
    part_ptr,  # f32 [S, T, E] out: logits over H chunk s
    T,
    E,
    H,
    H_CHUNK,  # inputs per chunk, a multiple of BLOCK_K
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """part[s, t, e] = sum over h in chunk s of x[t, h] * w[e, h], H walked in BLOCK_K steps in
    order; grid (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E), S). The tensor cores compute it as 3xTF32 (x
    and w split into a TF32 high part and a TF32 remainder, three products): an f16 router is
    exact in TF32, and the result was closer to float64 than cuBLAS's float32 SGEMM on the H100
    (BENCHMARKS.md §9)."""
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    s = tl.program_id(2)
    kk = tl.arange(0, BLOCK_K)
    t_ok = rt < T
    e_ok = re < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(s * H_CHUNK, tl.minimum(s * H_CHUNK + H_CHUNK, H), BLOCK_K):
        k_ok = k0 + kk < H
        a = tl.load(x_ptr + rt[:, None] * H + (k0 + kk)[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + re[None, :].to(tl.int64) * H + (k0 + kk)[:, None], mask=k_ok[:, None] & e_ok[None, :],
                    other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")  # [BLOCK_T, BLOCK_E]
    tl.store(part_ptr + (s * T + rt[:, None]) * E + re[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0 to a few ulp (1 + u loses u's low bits; the ratio puts them back)."""
    w = 1.0 + u
    one = w == 1.0
    return tl.where(one, u, tl.log(w) * (u / tl.where(one, 1.0, w - 1.0)))


@triton.jit
def route_select_kernel(
    part_ptr,  # f32 [S, T, E]: logit chunks
    bias_ptr,  # f32 [E] (HAS_BIAS)
    tok_ptr,  # int32 [T] token ids (HASH)
    table_ptr,  # int32 [V, k] hash table (HASH)
    ids_ptr,  # int32 [T, k] out
    wts_ptr,  # f32 [T, k] out
    T,
    E,
    V,
    S,
    scale,
    TOPK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HASH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,  # >= E, a power of two
    BLOCK_K: tl.constexpr,  # >= TOPK, a power of two
):
    """ids and route weights of BLOCK_T tokens; grid (cdiv(T, BLOCK_T),).

    z = chunk sum in chunk order; p = sqrt(softplus(z)); ids = top-k of p + bias (descending,
    lower index first on ties, NaN below every number, -0 ties +0), or table[clamp(token, 0, V-1)]
    in HASH mode (bias unused); w = (p[id] / max(S, 2^-14)) * scale with S the slot-order sum and
    p[id] = 0 for an id outside [0, E)."""
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, BLOCK_E)
    slot = tl.arange(0, BLOCK_K)
    t_ok = rt < T
    e_ok = re < E
    m = t_ok[:, None] & e_ok[None, :]
    z = tl.load(part_ptr + rt[:, None] * E + re[None, :], mask=m, other=0.0)  # [BLOCK_T, BLOCK_E]
    for s in range(1, S):
        z += tl.load(part_ptr + (s * T + rt[:, None]) * E + re[None, :], mask=m, other=0.0)
    ez = tl.exp(z)
    soft = tl.where(z > SOFTPLUS_HIGH, z, tl.where(z < SOFTPLUS_LOW, ez, _log1p(ez)))
    p = tl.where(e_ok[None, :], tl.sqrt_rn(soft), 0.0)  # a padding column is never read as an expert
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    w_raw = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    if HASH:
        tok = tl.load(tok_ptr + rt, mask=t_ok, other=0)
        tok = tl.minimum(tl.maximum(tok, 0), V - 1).to(tl.int64)
        ids = tl.load(table_ptr + tok[:, None] * TOPK + slot[None, :], mask=t_ok[:, None] & (slot < TOPK)[None, :],
                      other=0)
        for j in tl.static_range(TOPK):
            e_j = tl.sum(tl.where(slot[None, :] == j, ids, 0), axis=1)
            p_j = tl.sum(tl.where(re[None, :] == e_j[:, None], p, 0.0), axis=1)  # 0 for an id outside [0, E)
            w_raw = tl.where(slot[None, :] == j, p_j[:, None], w_raw)
    else:
        sc = p
        if HAS_BIAS:
            sc = p + tl.load(bias_ptr + re, mask=e_ok, other=0.0)[None, :]
        sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 ties +0.0
        bits = sc.to(tl.int32, bitcast=True)
        # IEEE floats order like sign-magnitude ints; NaN one above the sentinel of taken columns
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        ordered = tl.where(sc != sc, -2147483647, ordered)
        key = ordered.to(tl.int64) * 4294967296 + (E - 1 - re)[None, :]  # unique in a row
        taken = tl.full((BLOCK_T, BLOCK_E), -2147483648, tl.int64) * 4294967296
        key = tl.where(e_ok[None, :], key, taken)
        for j in tl.static_range(TOPK):
            best = tl.max(key, axis=1)  # [BLOCK_T]
            e_j = (E - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
            key = tl.where(key == best[:, None], taken, key)
            p_j = tl.sum(tl.where(re[None, :] == e_j[:, None], p, 0.0), axis=1)
            ids = tl.where(slot[None, :] == j, e_j[:, None], ids)
            w_raw = tl.where(slot[None, :] == j, p_j[:, None], w_raw)
    total = tl.sum(tl.where(slot[None, :] == 0, w_raw, 0.0), axis=1)
    for j in tl.static_range(1, TOPK):  # slot order, one rounding per add
        total = total + tl.sum(tl.where(slot[None, :] == j, w_raw, 0.0), axis=1)
    total = tl.where(total < WEIGHT_FLOOR, WEIGHT_FLOOR, total)  # NaN stays NaN
    wts = (w_raw / total[:, None]) * scale
    out = rt[:, None] * TOPK + slot[None, :]
    keep = t_ok[:, None] & (slot < TOPK)[None, :]
    tl.store(ids_ptr + out, ids, mask=keep)
    tl.store(wts_ptr + out, wts, mask=keep)
