"""ds4 router: logits, ``sqrt(softplus)`` scores, top-k or hash selection, route weights.

Letters: T tokens, H hidden size, E routed experts, k experts per token, V hash-table rows.

Everything here is device-agnostic torch and, unless ``validate=True`` is asked for, free of
host synchronisation (no ``.item()``, no boolean-mask indexing, no branching on tensor values), so
a layer that calls :func:`route` can be captured in a CUDA graph. The float64 oracle with the same
arguments is :mod:`moetile.reference_routing`. The layer routes with :func:`moetile.ops.router.route`
(two Triton kernels, the same rules; these torch steps where no kernel runs).

Deterministic rules (ds4 ``8d576642c39b``, CPU and CUDA backends):

* top-k is taken in descending score order and the **lower expert index wins a tie**;
* NaN scores rank below every number (never chosen while a number is left), lower index first;
  ``-0.0`` ties with ``+0.0``;
* route weights use the unbiased score, a slot-order float32 sum and the ``2^-14`` floor;
* expert ids outside ``[0, E)`` (only a bad hash table can produce them) read nothing and get
  ``w_raw = 0``, as ds4's CUDA backend does. Here the rule ends: the expert kernels (and the
  float64 reference) give such a pair a NaN row, so ``moe_forward`` with ``validate=False`` returns
  NaN for that token and no other; ``validate=True`` raises, and a GGUF layer holding such a
  table is refused when it is loaded (``MoELayerTensors``).
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROUTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WEIGHT_FLOOR = 2.0**-14  # 6.103515625e-5, the smallest normal f16: ds4's denominator floor
SOFTPLUS_HIGH = 20.0  # softplus(z) = z above this
SOFTPLUS_LOW = -20.0  # softplus(z) = exp(z) below this

__all__ = [
    "WEIGHT_FLOOR",
    "ds4_scores",
    "hash_select",
    "route",
    "route_weights",
    "router_logits",
    "select_topk",
]


# --------------------------------------------------------------------------------------------
# the steps


def router_logits(x: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """float32 [T, E] = x @ w_router.T with float32 operands and float32 accumulation.

    x: [T, H] float32/bfloat16/float16 (float64 is rounded to float32). w_router: [E, H]
    float16 (the GGUF router; float32 and bfloat16 are accepted too), upcast exactly to float32.

    x is kept in float32. ds4's CPU, CUDA T=1 and Metal T<=8 paths do the same; its CUDA T>1 and
    Metal prefill (T>8) paths round x to float16 before the matmul, so their logits differ from
    these by up to ~2^-11 relative per product. On CUDA the float32 matmul follows torch's global
    float32 matmul precision: keep TF32 off (torch's default) for float32-accurate logits.
    """
    _check_x_router(x, w_router)
    return x.to(torch.float32) @ w_router.to(torch.float32).t()  # [T, E]


def ds4_scores(logits: torch.Tensor) -> torch.Tensor:
    """float32 [T, E] p = sqrt(softplus(z)), softplus by ds4's CPU/CUDA definition.

    softplus(z) = z for z > 20, exp(z) for z < -20, log1p(exp(z)) otherwise, all in float32.
    (ds4's Metal kernels drop the low branch and use log(1+exp(z)); the difference is below
    float32 resolution of p only for z < -20, where p < 5e-5.) NaN stays NaN.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {_describe(logits)}")
    z = logits.to(torch.float32)
    ez = torch.exp(z)  # overflows to inf only where the z > 20 branch is taken
    soft = torch.where(z > SOFTPLUS_HIGH, z, torch.where(z < SOFTPLUS_LOW, ez, torch.log1p(ez)))
    return torch.sqrt(soft)


def select_topk(scores: torch.Tensor, bias: torch.Tensor | None = None, k: int = 6) -> torch.Tensor:
    """int32 [T, k]: the k largest of ``scores + bias`` (float32 add), in descending order.

    scores: [T, E] float (float32 in ds4). bias: [E] float or None. Ties go to the lower expert
    index, placed first; NaN ranks below every number. torch.topk promises no tie order, so each
    score is mapped to an order-preserving int32 and packed with the reversed index into one
    unique int64 key; topk over unique keys has exactly one answer on every device.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() != 2:
        raise TypeError(f"scores must be a floating-point [T, E] tensor, got {_describe(scores)}")
    E = scores.shape[1]
    _check_k(k, E)
    s = scores.to(torch.float32)
    if bias is not None:
        _check_bias(bias, E, s.device)
        s = s + bias.to(torch.float32)  # [T, E]
    key = _desc_key(s)  # int64 [T, E], all distinct within a row
    return torch.topk(key, k, dim=1, largest=True, sorted=True).indices.to(torch.int32)


def hash_select(
    token_ids: torch.Tensor,
    table: torch.Tensor,
    *,
    validate: bool = False,
    n_experts: int | None = None,
) -> torch.Tensor:
    """int32 [T, k]: ``table[token_ids[t]]``, row entries in table order (that order is the slot order).

    token_ids: [T] integer. table: [V, k] int32 (int64 accepted), ds4's ``ffn_gate_tid2eid``.
    With ``validate=False`` (the default, no host sync) out-of-range token ids are clamped into
    [0, V) (negative ids read row 0, ids >= V read row V-1): no error, never an out-of-bounds
    read. With ``validate=True`` a ValueError names the first bad token id (this syncs), and if
    ``n_experts`` is given the rows read are also checked to hold expert ids in [0, n_experts).
    """
    _check_hash(token_ids, table, None, None)
    V = table.shape[0]
    tok = token_ids.to(torch.int64)
    if validate:
        _validate_token_ids(tok, V)
    rows = table.index_select(0, tok.clamp(0, V - 1))  # [T, k]
    if validate and n_experts is not None:
        _validate_expert_ids(rows, n_experts, "hash table rows")
    return table_ids_int32(rows)


def table_ids_int32(rows: torch.Tensor) -> torch.Tensor:
    """int32 expert ids of hash-table entries: a wider entry outside the int32 range becomes -1 (an
    expert id outside [0, E), as it was) rather than wrapping: 2**32 + e must not read expert e."""
    if rows.dtype == torch.int32:
        return rows
    fits = (rows >= -(2**31)) & (rows < 2**31)
    return torch.where(fits, rows, torch.full_like(rows, -1)).to(torch.int32)


def route_weights(scores: torch.Tensor, ids: torch.Tensor, scale: float = 1.5) -> torch.Tensor:
    """float32 [T, k]: w = (p[ids] / max(S, 2^-14)) * scale, S = p[ids] summed in slot order.

    scores: [T, E] the *unbiased* p (float32). ids: [T, k] integer. S is a sequential float32
    sum over slots 0..k-1 (ds4 CPU, CUDA and Metal decode); the division comes before the
    multiplication by ``scale``. Ids outside [0, E) read nothing and count as p = 0. A NaN p
    makes the whole row NaN.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() != 2:
        raise TypeError(f"scores must be a floating-point [T, E] tensor, got {_describe(scores)}")
    T, E = scores.shape
    if E < 1:
        raise ValueError(f"scores must have E >= 1 columns, got shape {tuple(scores.shape)}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != T or ids.shape[1] < 1:
        raise ValueError(f"ids must be [T={T}, k>=1], got {_describe(ids)}")
    if not _is_int_tensor(ids):
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.device != scores.device:
        raise ValueError(f"ids is on {ids.device} but scores is on {scores.device}")
    check_scale(scale)
    p = scores.to(torch.float32)
    idx = ids.to(torch.int64)
    safe = idx.clamp(0, E - 1)
    w_raw = torch.where(safe == idx, torch.gather(p, 1, safe), 0.0)  # [T, k]; bad ids read nothing
    total = w_raw[:, 0]
    for s in range(1, w_raw.shape[1]):  # fixed slot order, one rounding per add
        total = total + w_raw[:, s]
    total = torch.clamp(total, min=WEIGHT_FLOOR)  # NaN stays NaN
    return (w_raw / total[:, None]) * float(scale)


def route(
    x: torch.Tensor,
    w_router: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    hash_table: torch.Tensor | None = None,
    k: int = 6,
    scale: float = 1.5,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ds4 routing of T tokens: (ids int32 [T, k], weights float32 [T, k]).

    x: [T, H] float (the ffn_norm output). w_router: [E, H] float16/float32. bias: [E] float or
    None (``exp_probs_b``). Hash mode iff ``hash_table`` ([V, k] int32, ``ffn_gate_tid2eid``) is
    given: ids are its rows for ``token_ids`` ([T] integer, then required) and ``bias`` is ignored
    (its shape is still checked); otherwise ids are the top-k of p + bias and ``token_ids`` is
    only shape-checked. The weights always come from the unbiased p (see route_weights).
    ``validate=True`` also checks token ids (and the table entries read) against their ranges,
    which syncs with the host; without it nothing syncs (see hash_select for the clamping).
    """
    _check_route_args(x, w_router, bias, token_ids, hash_table, k, scale)
    E = w_router.shape[0]
    p = ds4_scores(router_logits(x, w_router))  # [T, E]
    if hash_table is not None:
        ids = hash_select(token_ids, hash_table, validate=validate, n_experts=E)
    else:
        ids = select_topk(p, bias, k)
    return ids, route_weights(p, ids, scale)


# --------------------------------------------------------------------------------------------
# helpers


def _desc_key(s: torch.Tensor) -> torch.Tensor:
    """int64 [T, E]: larger key = ranks first; (score desc, index asc), NaN below -inf."""
    E = s.shape[1]
    s = torch.where(s == 0, 0.0, s)  # -0.0 and +0.0 must tie
    bits = s.view(torch.int32)
    # IEEE floats order like sign-magnitude ints: flip the magnitude bits of negatives
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).masked_fill_(torch.isnan(s), -(2**31))
    rev_index = torch.arange(E - 1, -1, -1, device=s.device, dtype=torch.int64)  # lower index: larger
    return ordered.to(torch.int64) * (2**32) + rev_index


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__}"


def _is_int_tensor(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_k(k, E: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got k={k}")


_F32_MAX = 3.4028234663852886e38


def check_scale(scale) -> None:
    """Raise unless the route weight scale is a number finite in float32 (the weights' dtype)."""
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
            or abs(scale) > _F32_MAX):  # the weights are float32: a larger scale makes them inf
        raise ValueError(f"scale must be a number finite in float32, got {scale!r}")


def _check_x_router(x, w_router) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [T, H], got {_describe(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32/bfloat16/float16 [T, H], got {_describe(x)}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, H], got {_describe(x)}")
    if not isinstance(w_router, torch.Tensor):
        raise TypeError(f"w_router must be a torch.Tensor [E, H], got {_describe(w_router)}")
    if w_router.dtype not in ROUTER_DTYPES:
        raise TypeError(f"w_router must be float16 (or float32/bfloat16) [E, H], got {_describe(w_router)}")
    if w_router.dim() != 2 or w_router.shape[0] < 1:
        raise ValueError(f"w_router must be 2-D [E>=1, H], got {_describe(w_router)}")
    if w_router.shape[1] != x.shape[1]:
        raise ValueError(
            f"hidden size mismatch: x is {tuple(x.shape)} [T, H] but w_router is "
            f"{tuple(w_router.shape)} [E, H]; expected x.shape[1] == {w_router.shape[1]}"
        )
    if w_router.device != x.device:
        raise ValueError(f"w_router is on {w_router.device} but x is on {x.device}")


def _check_bias(bias, E: int, device: torch.device) -> None:
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor [E={E}], got {_describe(bias)}")
    if tuple(bias.shape) != (E,):
        raise ValueError(f"bias must have shape ({E},) [E], got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but the scores are on {device}")


def _check_hash(token_ids, table, T: int | None, k: int | None) -> None:
    if not isinstance(table, torch.Tensor) or not _is_int_tensor(table):
        raise TypeError(f"hash_table must be an int32 tensor [V, k], got {_describe(table)}")
    if table.dim() != 2 or table.shape[0] < 1:
        raise ValueError(f"hash_table must be 2-D [V>=1, k], got {_describe(table)}")
    if k is not None and table.shape[1] != k:
        raise ValueError(f"hash_table must be [V, k={k}], got shape {tuple(table.shape)}")
    if token_ids is None:
        raise ValueError("token_ids is required in hash mode (hash_table given): expected a [T] int tensor")
    if not isinstance(token_ids, torch.Tensor) or not _is_int_tensor(token_ids):
        raise TypeError(f"token_ids must be an integer tensor [T], got {_describe(token_ids)}")
    if token_ids.dim() != 1 or (T is not None and token_ids.shape[0] != T):
        want = f"[T={T}]" if T is not None else "[T]"
        raise ValueError(f"token_ids must be 1-D {want}, got shape {tuple(token_ids.shape)}")
    if table.device != token_ids.device:
        raise ValueError(f"hash_table is on {table.device} but token_ids is on {token_ids.device}")


def _check_route_args(x, w_router, bias, token_ids, hash_table, k, scale) -> None:
    _check_x_router(x, w_router)
    T, E = x.shape[0], w_router.shape[0]
    _check_k(k, E)
    check_scale(scale)
    if bias is not None:
        _check_bias(bias, E, x.device)
    if hash_table is not None:
        _check_hash(token_ids, hash_table, T, k)
        if hash_table.device != x.device:
            raise ValueError(f"hash_table is on {hash_table.device} but x is on {x.device}")
    elif token_ids is not None:
        if not isinstance(token_ids, torch.Tensor) or not _is_int_tensor(token_ids):
            raise TypeError(f"token_ids must be an integer tensor [T], got {_describe(token_ids)}")
        if tuple(token_ids.shape) != (T,):
            raise ValueError(f"token_ids must have shape ({T},) [T], got {tuple(token_ids.shape)}")


def _validate_token_ids(tok: torch.Tensor, V: int) -> None:
    """Raise naming the first token id outside [0, V) (host sync)."""
    bad = (tok < 0) | (tok >= V)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"token_ids[{pos}] = {int(tok[pos])} is outside the hash table's rows [0, {V}) "
            f"({int(bad.sum())} bad token id(s) in all)"
        )


def _validate_expert_ids(ids: torch.Tensor, E: int, what: str) -> None:
    bad = (ids < 0) | (ids >= E)
    if bool(bad.any()):
        t, s = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{what} hold expert id {int(ids[t, s])} at token {t}, slot {s}: outside [0, {E})")
