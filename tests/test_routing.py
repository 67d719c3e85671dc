"""routing.py against the float64 oracle in reference_routing.py, plus the exact ds4 rules:
tie order, slot order, bias only in selection, hash rows, the 2^-14 floor, softplus branches,
input errors, token-id range handling and NaN isolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import NEAR_TIE, check_topk_against_ref, gen, make_case

from moetile.reference_routing import (
    ds4_scores_ref,
    hash_select_ref,
    route_ref,
    route_weights_ref,
    router_logits_ref,
    select_topk_ref,
)
from moetile.routing import (
    WEIGHT_FLOOR,
    ds4_scores,
    hash_select,
    route,
    route_weights,
    router_logits,
    select_topk,
)

CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# against the float64 oracle


@pytest.mark.parametrize("E,H", [(16, 64), (16, 256), (256, 64), (256, 256)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_reference(E, H, x_dtype, with_bias):
    T, k = 48, 6
    x, w, bias = make_case(T, E, H, seed=E + H + (7 if with_bias else 0), x_dtype=x_dtype)
    b = bias if with_bias else None
    ids, weights = route(x, w, bias=b, k=k)
    near = check_topk_against_ref(x, w, b, k, ids, weights)
    assert near <= T // 8, f"{near} of {T} tokens near-tied: the test data is too degenerate"
    ids_ref, w_ref = route_ref(x, w, bias=b, k=k)
    agree = (ids == ids_ref).all(dim=1)
    assert int(agree.sum()) >= T - near
    torch.testing.assert_close(weights[agree].double(), w_ref[agree], rtol=2e-5, atol=1e-7)


def test_near_tie_count_reported(capsys):
    """Bigger batch: count tokens whose order is within NEAR_TIE in f64 (printed).

    Experts 1 and 3 duplicate 0 and 2 (same row, same bias), so near-ties do occur and the
    tolerant branch of the check runs; random data alone gives almost none."""
    T, E, H, k = 256, 256, 128, 6
    x, w, bias = make_case(T, E, H, seed=11)
    ids, weights = route(x, w, bias=bias, k=k)
    near_random = check_topk_against_ref(x, w, bias, k, ids, weights)
    w[1], w[3] = w[0], w[2]
    bias[1], bias[3] = bias[0], bias[2]
    ids, weights = route(x, w, bias=bias, k=k)
    near_dup = check_topk_against_ref(x, w, bias, k, ids, weights)
    with capsys.disabled():
        print(
            f"\n[test_routing] tokens with a near-tie (gap < {NEAR_TIE:g}) among the top {k + 1}: "
            f"random {near_random}/{T}, with 2 duplicated experts {near_dup}/{T}"
        )
    assert near_random <= T // 16
    assert 0 < near_dup <= T // 4


def test_steps_compose_to_route():
    x, w, bias = make_case(20, 32, 64, seed=3)
    p = ds4_scores(router_logits(x, w))
    ids = select_topk(p, bias, 4)
    got_ids, got_w = route(x, w, bias=bias, k=4, scale=2.5)
    assert torch.equal(got_ids, ids)
    assert torch.equal(got_w, route_weights(p, ids, 2.5))


@pytest.mark.parametrize("k", [1, 2, 16])
def test_k_values(k):
    x, w, bias = make_case(24, 16, 64, seed=k)
    ids, weights = route(x, w, bias=bias, k=k)
    check_topk_against_ref(x, w, bias, k, ids, weights)
    if k == 16:  # every expert once: a permutation
        assert torch.equal(ids.sort(dim=1).values, torch.arange(16, dtype=torch.int32).expand(24, 16))
    torch.testing.assert_close(
        weights.double().sum(dim=1), torch.full((24,), 1.5, dtype=torch.float64), rtol=2e-6, atol=0
    )


def test_zero_tokens():
    x, w, bias = make_case(0, 16, 64, seed=0)
    for kw in (
        {"bias": bias},
        {
            "hash_table": torch.zeros(5, 6, dtype=torch.int32) + 3,
            "token_ids": torch.zeros(0, dtype=torch.int64),
        },
    ):
        ids, weights = route(x, w, **kw)
        assert ids.shape == (0, 6) and ids.dtype == torch.int32
        assert weights.shape == (0, 6) and weights.dtype == torch.float32
        ids_ref, w_ref = route_ref(x, w, **kw)
        assert ids_ref.shape == (0, 6) and w_ref.shape == (0, 6)


# --------------------------------------------------------------------------------------------
# router logits and scores


def test_router_logits_keep_x_in_f32():
    """x is not rounded to f16: values f16 cannot hold come through exactly."""
    E, H = 8, 64
    g = gen(5)
    x = torch.randn(4, H, generator=g)
    x[:, 0] = torch.tensor([1 + 2.0**-12, 1e-8, 70000.0, -(1 + 2.0**-20)])  # all lost in f16
    w = torch.zeros(E, H, dtype=torch.float16)
    w[torch.arange(E), torch.arange(E)] = 1.0  # logit e = x[:, e]
    out = router_logits(x, w)
    assert out.dtype == torch.float32 and out.shape == (4, E)
    assert torch.equal(out, x[:, :E])
    assert not torch.equal(out, x[:, :E].half().float())  # the data does discriminate


@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [(torch.bfloat16, torch.float16), (torch.float16, torch.float32), (torch.float32, torch.float32)],
)
def test_router_logits_dtypes(x_dtype, w_dtype):
    x, w, _ = make_case(16, 32, 128, seed=9, x_dtype=x_dtype)
    out = router_logits(x, w.to(w_dtype))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), router_logits_ref(x, w), rtol=1e-5, atol=1e-5)


def test_softplus_branches():
    z = torch.tensor(
        [100.0, 89.0, 25.0, 20.5, 20.0, 19.5, 3.0, 0.0, -0.0, -3.0, -19.5, -20.0, -20.5, -25.0, -60.0, -87.0]
    )
    p = ds4_scores(z[None, :])[0]
    assert p.dtype == torch.float32
    # z > 20: p = sqrt(z) exactly; at z = 100 and 89 exp() overflows f32, so only the branch gives it
    hi = z > 20
    assert torch.equal(p[hi], torch.sqrt(z[hi]))
    assert torch.isinf(torch.exp(z[:2])).all()
    # everything against the float64 definition (f32 exp/log1p/sqrt: a few ulp)
    ref = ds4_scores_ref(z[None, :])[0]
    torch.testing.assert_close(p.double(), ref, rtol=1e-6, atol=0)
    # z < -20: p = sqrt(exp(z)); check the value itself, not just the reference code
    lo = z < -20
    expect = torch.tensor([math.sqrt(math.exp(v)) for v in z[lo].tolist()], dtype=torch.float64)
    torch.testing.assert_close(p[lo].double(), expect, rtol=1e-6, atol=0)
    # mid branch: log1p, not log(1 + e^z) (which is 0 in f32 for z = -19.5)
    mid = z.abs() <= 20
    expect = torch.tensor([math.sqrt(math.log1p(math.exp(v))) for v in z[mid].tolist()], dtype=torch.float64)
    torch.testing.assert_close(p[mid].double(), expect, rtol=1e-6, atol=0)
    assert p[z == -19.5].item() > 0


def test_scores_special_values():
    z = torch.tensor([[float("inf"), float("-inf"), float("nan"), 1.0]])
    p = ds4_scores(z)
    assert math.isinf(p[0, 0]) and p[0, 1] == 0 and math.isnan(p[0, 2])
    assert ds4_scores(z.half()).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# selection


def test_exact_ties_lower_index_first():
    s = torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0, 3.0, 0.5, 2.0, 3.0],
            [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
            [0.0, -0.0, 0.0, -0.0, 1.0, -0.0, 0.0, -1.0],
        ]
    )
    ids = select_topk(s, None, 6)
    assert ids.tolist() == [[1, 2, 4, 7, 3, 6], [0, 1, 2, 3, 4, 5], [4, 0, 1, 2, 3, 5]]
    # the tie can also come from the bias: 1 + 1 == 2 + 0
    s2 = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    assert select_topk(s2, torch.tensor([1.0, 0.0, 0.0, 0.0]), 2).tolist() == [[0, 1]]
    assert select_topk(s2, torch.tensor([0.0, 0.0, 2.0, 0.0]), 2).tolist() == [[1, 2]]


@pytest.mark.parametrize("E", [16, 256])
def test_tie_heavy_scores_match_reference(E):
    """Scores and bias from a handful of values: most rows have ties at the k boundary."""
    g = gen(E)
    T = 64
    s = torch.randint(0, 4, (T, E), generator=g).float() / 2
    s[torch.rand(T, E, generator=g) < 0.1] *= -1.0  # some -0.0 too
    bias = torch.randint(-2, 3, (E,), generator=g).float() / 4
    for b in (None, bias):
        ids = select_topk(s, b, 6)
        assert torch.equal(ids, select_topk_ref(s, b, 6))


def test_specials_in_scores_match_reference():
    """NaN ranks last, -inf below every number, +inf first; lower index wins among equals."""
    g = gen(1)
    T, E = 40, 16
    s = torch.randint(0, 3, (T, E), generator=g).float()
    pick = torch.randint(0, 5, (T, E), generator=g)
    s[pick == 0] = float("nan")
    s[pick == 1] = float("-inf")
    s[(pick == 2) & (torch.rand(T, E, generator=g) < 0.2)] = float("inf")
    s[0] = float("nan")
    s[1, :12] = float("nan")  # only 4 numbers left: the top 6 takes 2 NaNs, lowest indices
    for k in (6, 16):
        ids = select_topk(s, None, k)
        assert torch.equal(ids, select_topk_ref(s, None, k))
    assert select_topk(s, None, 6)[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert select_topk(s, None, 6)[1, 4:].tolist() == [0, 1]


@pytest.mark.parametrize("E", [16, 256])
def test_descending_order(E):
    g = gen(2 + E)
    s = torch.randn(100, E, generator=g)
    s[:, ::3] = torch.round(s[:, ::3])  # plenty of equal values
    ids = select_topk(s, None, 6).long()
    chosen = torch.gather(s, 1, ids)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
    eq = chosen[:, :-1] == chosen[:, 1:]
    assert (ids[:, :-1][eq] < ids[:, 1:][eq]).all()
    # nothing left out beats the last chosen
    kth = chosen[:, -1:]
    left = s.clone()
    left.scatter_(1, ids, float("-inf"))
    assert (left <= kth).all()


def test_bias_changes_selection_not_weights():
    T, E, H, k = 32, 64, 128, 6
    x, w, _ = make_case(T, E, H, seed=21)
    p = ds4_scores(router_logits(x, w))
    low = int(p[0].argmin())  # the weakest expert of token 0
    bias = torch.zeros(E)
    bias[low] = 10.0
    bias[(low + 1) % E] = -0.25
    ids0, w0 = route(x, w, k=k)
    ids1, w1 = route(x, w, bias=bias, k=k)
    assert int(ids1[0, 0]) == low and low not in ids0[0].tolist()
    assert not torch.equal(ids0, ids1)
    # weights from the unbiased p at the biased selection
    assert torch.equal(w1, route_weights(p, ids1))
    assert w1[0, 0] < w1[0, 1:].min()  # small p stays a small weight despite the +10 bias
    check_topk_against_ref(x, w, bias, k, ids1, w1)
    ids_r, w_r = route_ref(x, w, bias=bias, k=k)
    assert torch.equal(ids_r, ids1)
    torch.testing.assert_close(w1.double(), w_r, rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# hash layers


def make_table(V: int, E: int, k: int, seed: int) -> torch.Tensor:
    """int32 [V, k]: distinct experts per row, in an unsorted order."""
    g = gen(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(V)]).to(torch.int32)


@pytest.mark.parametrize("k", [6, 4])
def test_hash_mode_table_order_and_bias_ignored(k):
    T, E, H, V = 40, 32, 64, 50
    x, w, bias = make_case(T, E, H, seed=31)
    table = make_table(V, E, k, seed=32)
    tok = torch.randint(0, V, (T,), generator=gen(33))
    tok[:3] = tok[3]  # repeated tokens
    ids, weights = route(x, w, token_ids=tok, hash_table=table, k=k)
    assert ids.dtype == torch.int32 and torch.equal(ids, table[tok])
    assert not torch.equal(ids, ids.sort(dim=1).values)  # table order, not sorted
    big = bias * 100
    big[table[tok[0], -1]] = 1e6
    ids_b, weights_b = route(x, w, bias=big, token_ids=tok, hash_table=table, k=k)
    assert torch.equal(ids_b, ids) and torch.equal(weights_b, weights)
    p = ds4_scores(router_logits(x, w))
    assert torch.equal(weights, route_weights(p, ids))
    ids_r, w_r = route_ref(x, w, bias=big, token_ids=tok, hash_table=table, k=k)
    assert torch.equal(ids_r, ids)
    torch.testing.assert_close(weights.double(), w_r, rtol=2e-5, atol=1e-7)
    # int64 token ids and table are accepted as well
    ids64, _ = route(x, w, token_ids=tok.to(torch.int32), hash_table=table.long(), k=k)
    assert torch.equal(ids64, ids)


def test_hash_token_out_of_range():
    V, E, k = 10, 16, 6
    table = make_table(V, E, k, seed=41)
    tok = torch.tensor([3, 12, -1, 50, 9])
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 12 .*\[0, 10\)"):
        hash_select(tok, table, validate=True)
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 12"):
        hash_select_ref(tok, table, validate=True)
    got = hash_select(tok, table)  # clamped: no crash, no out-of-bounds read
    assert torch.equal(got, table[torch.tensor([3, 9, 0, 9, 9])])
    assert torch.equal(hash_select_ref(tok, table), got)
    x, w, _ = make_case(5, E, 64, seed=42)
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 12"):
        route(x, w, token_ids=tok, hash_table=table, validate=True)
    ids, weights = route(x, w, token_ids=tok, hash_table=table)
    assert torch.equal(ids, got) and torch.isfinite(weights).all()
    ok = torch.tensor([0, 1, 2, 3, 9])
    assert torch.equal(hash_select(ok, table, validate=True), table[ok])


def test_hash_table_expert_out_of_range():
    """A bad table entry never reads out of bounds: it counts as p = 0 (ds4 CUDA's rule)."""
    V, E, k = 6, 16, 6
    table = make_table(V, E, k, seed=51)
    table[2, 1] = 300
    table[4, 0] = -5
    tok = torch.tensor([2, 4, 0])
    x, w, _ = make_case(3, E, 64, seed=52)
    with pytest.raises(ValueError, match="expert id 300 at token 0, slot 1"):
        route(x, w, token_ids=tok, hash_table=table, validate=True)
    ids, weights = route(x, w, token_ids=tok, hash_table=table)
    assert ids[0, 1] == 300 and ids[1, 0] == -5
    assert weights[0, 1] == 0 and weights[1, 0] == 0 and torch.isfinite(weights).all()
    _, w_r = route_ref(x, w, token_ids=tok, hash_table=table)
    torch.testing.assert_close(weights.double(), w_r, rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# route weights


def seq_f32_weights(w_raw: np.ndarray, scale: float) -> np.ndarray:
    """numpy float32: slot-order sum, floor, divide, then multiply."""
    total = w_raw[:, 0].copy()
    for s in range(1, w_raw.shape[1]):
        total = total + w_raw[:, s]
    total = np.maximum(total, np.float32(WEIGHT_FLOOR))
    return (w_raw / total[:, None]) * np.float32(scale)


def test_weights_slot_order_sum():
    one, tiny = 1.0, 2.0**-24
    p = torch.tensor([[one, tiny, tiny, tiny, tiny, tiny, 0.25, 0.5]])  # [1, 8]
    ids = torch.tensor([[0, 1, 2, 3, 4, 5]], dtype=torch.int32)
    got = route_weights(p, ids, 1.5)
    # slot order: 1 + tiny rounds back to 1 each time; reversed order would keep 5 tinies
    assert np.float32(1) + np.float32(tiny) == np.float32(1)
    rev = np.float32(0)
    for v in p[0, :6].numpy()[::-1]:
        rev = rev + v
    assert rev != np.float32(1)
    assert got[0, 0].item() == 1.5
    assert torch.equal(got, torch.from_numpy(seq_f32_weights(p[:, :6].numpy(), 1.5)))
    # the other order changes the answer
    got_rev = route_weights(p, ids.flip(1), 1.5)
    assert got_rev[0, -1].item() != 1.5


def test_weights_divide_then_multiply():
    g = gen(61)
    T, E, k = 2000, 32, 6
    p = torch.rand(T, E, generator=g) * 3
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    got = route_weights(p, ids, 1.5).numpy()
    w_raw = np.take_along_axis(p.numpy(), ids.long().numpy(), axis=1)
    want = seq_f32_weights(w_raw, 1.5)
    assert np.array_equal(got, want)
    total = w_raw[:, 0].copy()
    for s in range(1, k):
        total = total + w_raw[:, s]
    other = w_raw * (np.float32(1.5) / total[:, None])  # multiply-first variant
    assert not np.array_equal(other, want)  # the data can tell the two apart


def test_weights_floor():
    # all-tiny: S = 6e-6 and 2.3e-5 < 2^-14, so S is floored and weights sum to 1.5 * S / 2^-14
    p = torch.full((2, 8), 1e-6)
    p[1] = torch.tensor([1e-6, 2e-6, 3e-6, 4e-6, 5e-6, 6e-6, 7e-6, 8e-6])
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 0, 3, 1, 2, 4]], dtype=torch.int32)
    got = route_weights(p, ids)
    w_raw = torch.gather(p, 1, ids.long())
    assert torch.equal(got, (w_raw / torch.tensor(WEIGHT_FLOOR)) * 1.5)
    sums = got.double().sum(dim=1)
    assert (sums < 1.0).all()
    torch.testing.assert_close(sums, w_raw.double().sum(dim=1) / WEIGHT_FLOOR * 1.5, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.double(), route_weights_ref(p, ids), rtol=1e-6, atol=0)
    # just above the floor: not floored, sums to 1.5
    p2 = torch.full((1, 8), WEIGHT_FLOOR / 6 * 1.01)
    assert math.isclose(route_weights(p2, ids[:1]).sum().item(), 1.5, rel_tol=1e-6)


def test_floor_through_route():
    """Logits of exactly -30 everywhere: p = sqrt(e^-30), S = 6p < 2^-14, ties give ids 0..5."""
    E, H = 16, 64
    x = torch.ones(3, H)
    x[1] *= 0.5
    w = torch.full((E, H), -30.0 / H, dtype=torch.float16)  # -0.46875, exact in f16
    ids, weights = route(x, w)
    assert ids[0].tolist() == [0, 1, 2, 3, 4, 5]
    p = math.sqrt(math.exp(-30.0))
    want = torch.full((6,), p / WEIGHT_FLOOR * 1.5, dtype=torch.float64)
    torch.testing.assert_close(weights[0].double(), want, rtol=1e-6, atol=0)
    ids_r, w_r = route_ref(x, w)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(weights.double(), w_r, rtol=1e-6, atol=0)


def test_exact_ties_through_route():
    """Integer-valued x and half-integer router rows: exact logits, many exact ties."""
    g = gen(71)
    T, E, H = 32, 256, 64
    x = torch.randint(-2, 3, (T, H), generator=g).float()
    w = (torch.randint(-1, 2, (E, H), generator=g).float() / 2).to(torch.float16)
    w[10] = w[3]  # guaranteed ties between experts 3 and 10
    ids, weights = route(x, w)
    ids_r, w_r = route_ref(x, w)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(weights.double(), w_r, rtol=2e-6, atol=0)
    logits = router_logits(x, w)
    chosen = torch.gather(logits, 1, ids.long())
    n_ties = int((chosen[:, :-1] == chosen[:, 1:]).sum())
    assert n_ties > 0  # the data really has ties among the chosen


# --------------------------------------------------------------------------------------------
# NaN isolation


@pytest.mark.parametrize("mode", ["topk", "hash"])
def test_nan_in_x_stays_in_its_token(mode):
    T, E, H, V = 8, 32, 64, 20
    x, w, bias = make_case(T, E, H, seed=81)
    kw = {"bias": bias}
    if mode == "hash":
        kw["hash_table"] = make_table(V, E, 6, seed=82)
        kw["token_ids"] = torch.randint(0, V, (T,), generator=gen(83))
    ids0, w0 = route(x, w, **kw)
    x_bad = x.clone()
    x_bad[3, 5] = float("nan")
    ids1, w1 = route(x_bad, w, **kw)
    others = torch.arange(T) != 3
    assert torch.equal(ids1[others], ids0[others]) and torch.equal(w1[others], w0[others])
    assert torch.isnan(w1[3]).all()
    assert ((ids1[3] >= 0) & (ids1[3] < E)).all() and len(set(ids1[3].tolist())) == 6
    if mode == "topk":  # every score NaN: documented rule gives the lowest indices
        assert ids1[3].tolist() == [0, 1, 2, 3, 4, 5]
        assert torch.equal(route_ref(x_bad, w, **kw)[0], ids1)
    else:
        assert torch.equal(ids1[3], ids0[3])


# --------------------------------------------------------------------------------------------
# input errors


def _base():
    x, w, bias = make_case(4, 16, 64, seed=91)
    table = make_table(10, 16, 6, seed=92)
    return {"x": x, "w_router": w, "bias": bias, "token_ids": torch.tensor([1, 2, 3, 4]), "hash_table": table}


BAD_INPUTS = [
    ("hidden size", {"w_router": torch.zeros(16, 32, dtype=torch.float16) + 1}, ValueError, "hidden size"),
    ("x int", {"x": torch.ones(4, 64, dtype=torch.int32)}, TypeError, "x must be"),
    ("x 1-D", {"x": torch.ones(64)}, ValueError, "x must be 2-D"),
    ("x list", {"x": [[1.0] * 64] * 4}, TypeError, "x must be"),
    ("router 3-D", {"w_router": torch.ones(2, 16, 64, dtype=torch.float16)}, ValueError, "w_router"),
    ("router int", {"w_router": torch.ones(16, 64, dtype=torch.int8)}, TypeError, "w_router"),
    ("router f64", {"w_router": torch.ones(16, 64, dtype=torch.float64)}, TypeError, "w_router"),
    ("bias shape", {"bias": torch.ones(15)}, ValueError, r"bias must have shape \(16,\)"),
    ("bias 2-D", {"bias": torch.ones(1, 16)}, ValueError, "bias must have shape"),
    ("bias int", {"bias": torch.ones(16, dtype=torch.int32)}, TypeError, "bias"),
    ("tokens len", {"token_ids": torch.tensor([1, 2, 3])}, ValueError, r"token_ids must be 1-D \[T=4\]"),
    ("tokens float", {"token_ids": torch.ones(4)}, TypeError, "token_ids"),
    ("tokens 2-D", {"token_ids": torch.ones(4, 1, dtype=torch.int64)}, ValueError, "token_ids"),
    ("table 1-D", {"hash_table": torch.ones(60, dtype=torch.int32)}, ValueError, "hash_table must be 2-D"),
    ("table k", {"hash_table": torch.ones(10, 5, dtype=torch.int32)}, ValueError, r"must be \[V, k=6\]"),
    ("table float", {"hash_table": torch.ones(10, 6)}, TypeError, "hash_table"),
    ("table empty", {"hash_table": torch.ones(0, 6, dtype=torch.int32)}, ValueError, "hash_table"),
    ("tokens missing", {"token_ids": None}, ValueError, "token_ids is required"),
    ("k > E", {"k": 17, "hash_table": None}, ValueError, r"k must be in \[1, E=16\]"),
    ("k = 0", {"k": 0, "hash_table": None}, ValueError, "k must be"),
    ("k float", {"k": 6.0, "hash_table": None}, TypeError, "k must be an int"),
    ("scale nan", {"scale": float("nan"), "hash_table": None}, ValueError, "scale"),
    ("scale beyond f32", {"scale": 1e39, "hash_table": None}, ValueError, "finite in float32"),
    ("tokens len topk", {"token_ids": torch.tensor([1]), "hash_table": None}, ValueError, "token_ids"),
]


@pytest.mark.parametrize("name,change,exc,msg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(name, change, exc, msg):
    args = {**_base(), **change}
    x, w = args.pop("x"), args.pop("w_router")
    with pytest.raises(exc, match=msg):
        route(x, w, **args)
    with pytest.raises(exc, match=msg):
        route_ref(x, w, **args)


def test_bad_inputs_of_steps():
    p = torch.rand(4, 8)
    with pytest.raises(ValueError, match="k must be"):
        select_topk(p, None, 9)
    with pytest.raises(TypeError, match="scores"):
        select_topk(p.long(), None, 2)
    with pytest.raises(ValueError, match=r"ids must be \[T=4"):
        route_weights(p, torch.zeros(3, 6, dtype=torch.int32))
    with pytest.raises(TypeError, match="ids must be an integer"):
        route_weights(p, torch.zeros(4, 6))
    with pytest.raises(TypeError, match="logits"):
        ds4_scores(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="token_ids is required"):
        hash_select(None, torch.ones(3, 6, dtype=torch.int32))


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("E,H", [(16, 64), (256, 256), (256, 4096)])
def test_cuda_matches_reference_without_sync(E, H):
    T, k, V = 300, 6, 64
    x, w, bias = make_case(T, E, H, seed=101, x_dtype=torch.bfloat16, device="cuda")
    table = make_table(V, E, k, seed=102).cuda()
    tok = torch.randint(-5, V + 5, (T,), generator=gen(103)).cuda()  # some out of range: clamped
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids, weights = route(x, w, bias=bias, k=k)
        ids_h, weights_h = route(x, w, bias=bias, token_ids=tok, hash_table=table, k=k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.is_cuda and weights.is_cuda
    check_topk_against_ref(x, w, bias, k, ids, weights)
    ids_r, w_r = route_ref(
        x.cpu(), w.cpu(), bias=bias.cpu(), token_ids=tok.cpu(), hash_table=table.cpu(), k=k
    )
    assert torch.equal(ids_h.cpu(), ids_r)
    torch.testing.assert_close(weights_h.cpu().double(), w_r, rtol=2e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_ties_and_specials_match_cpu():
    g = gen(111)
    T, E = 512, 256
    s = torch.randint(0, 4, (T, E), generator=g).float() / 2
    s[torch.rand(T, E, generator=g) < 0.1] *= -1.0
    s[torch.rand(T, E, generator=g) < 0.05] = float("nan")
    s[torch.rand(T, E, generator=g) < 0.05] = float("-inf")
    s[7] = float("nan")
    bias = torch.randint(-2, 3, (E,), generator=g).float() / 4
    for b in (None, bias):
        cpu = select_topk(s, b, 6)
        gpu = select_topk(s.cuda(), None if b is None else b.cuda(), 6).cpu()
        assert torch.equal(gpu, cpu)
    assert torch.equal(select_topk(s[:64], bias, 6), select_topk_ref(s[:64], bias, 6))
    p = torch.rand(T, E, generator=g)
    ids = select_topk(p, None, 6)
    assert torch.equal(route_weights(p.cuda(), ids.cuda()).cpu(), route_weights(p, ids))
