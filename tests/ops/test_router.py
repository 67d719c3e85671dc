"""ops/router.route: the router kernels (through the interpreter on CPU) against the float64 oracle
and against moetile.routing's torch steps on the cases where the rules decide (ties, NaN, ±0, inf,
hash tables with bad entries), and batch invariance."""

from __future__ import annotations

import pytest
import torch
from helpers import check_topk_against_ref, gen, make_case

from moetile import routing, schedule
from moetile.ops.router import route


@pytest.mark.parametrize("E, H, k", [(8, 96, 1), (72, 256, 6), (256, 512, 8), (16, 200, 16), (3000, 64, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_route_matches_reference(E, H, k, with_bias, device):
    """H of 1-4 chunks (128 under the interpreter), one not a multiple of the K step; E not a
    power of two (up to 3000: fewer tokens per select program); k up to E."""
    x, w, bias = make_case(37, E, H, seed=E + H + k, device=device)
    ids, wts = route(x, w, bias=bias if with_bias else None, k=k, scale=2.5)
    check_topk_against_ref(x, w, bias if with_bias else None, k, ids, wts, scale=2.5)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_route_other_dtypes(x_dtype, device):
    x, w, bias = make_case(20, 32, 128, seed=2, x_dtype=x_dtype, device=device)
    for wd in (torch.float16, torch.float32, torch.bfloat16):
        ids, wts = route(x, w.to(wd), bias=bias, k=4)
        check_topk_against_ref(x.float(), w.to(wd).float(), bias, k=4, ids=ids, weights=wts)


def _scores_case(device):
    """x whose first E columns are the logits (identity router): exact ties, NaN, ±0, huge values
    (exp overflows), the softplus branch edges and the weight floor."""
    E, H = 16, 128
    z = torch.tensor([
        [1.0] * 16,  # all tie: 0, 1, 2, ...
        [0.5, 2.0, 2.0, -1.0, 2.0, 0.0, -0.0, 3.0, 3.0, 1.0, 1.0, 1.0, -5.0, -5.0, 2.0, 0.5],
        [float("nan"), 1.0, float("nan"), -2.0, 0.0, -0.0, 5.0, float("nan")] + [-30.0] * 8,
        [1e30, 1.0, 2.0, -1e30, 20.0, 20.0001, -20.0, -20.0001] + [0.25] * 8,
        [-40.0] * 15 + [-39.0],  # every p tiny: the floor decides the weights
        [float("nan")] * 16,  # a NaN row: ids by index, weights NaN
    ])
    x = torch.zeros(z.shape[0], H)
    x[:, :E] = z
    w = torch.zeros(E, H, dtype=torch.float16)
    w[torch.arange(E), torch.arange(E)] = 1.0
    return x.to(device), w.to(device), E


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN and overflow in numpy, by design
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("bias", [None, "ties"])
def test_route_rules_match_the_torch_steps(k, bias, device):
    x, w, E = _scores_case(device)
    b = None if bias is None else torch.tensor([0.5, 0.0] * 8, device=device)
    ids, wts = route(x, w, bias=b, k=k, scale=1.5)
    ref_ids, ref_w = routing.route(x, w, bias=b, k=k, scale=1.5)
    assert torch.equal(ids, ref_ids), f"{ids.tolist()} != {ref_ids.tolist()}"
    torch.testing.assert_close(wts, ref_w, rtol=2e-6, atol=0, equal_nan=True)


def test_hash_mode_matches_the_torch_steps(device):
    """Table order is slot order; bias unused; token ids outside [0, V) clamp; an entry outside
    [0, E) reads nothing (weight 0) and is passed through for the expert kernels to refuse."""
    x, w, bias = make_case(12, 24, 256, seed=7, device=device)
    table = torch.stack([torch.randperm(24, generator=gen(i))[:4] for i in range(10)]).to(torch.int32)
    table[3, 2], table[5, 0] = 24, -1
    table = table.to(device)
    tok = torch.tensor([0, 3, 5, 9, -4, 10, 2**40, 1, 2, 3, 4, 5], device=device)
    ids, wts = route(x, w, bias=bias, token_ids=tok, hash_table=table, k=4)
    ref_ids, ref_w = routing.route(x, w, bias=bias, token_ids=tok, hash_table=table, k=4)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(wts, ref_w, rtol=2e-6, atol=1e-9)
    with pytest.raises(ValueError, match="token_ids"):
        route(x, w, token_ids=tok, hash_table=table, k=4, validate=True)
    with pytest.raises(ValueError, match="hash table rows"):
        route(x, w, token_ids=tok.clamp(0, 9), hash_table=table, k=4, validate=True)


def test_wide_table_entries_do_not_wrap(device):
    """An int64 table entry of 2**32 + e is outside [0, E), not expert e: validate=True names it,
    otherwise it reads nothing (weight 0) and goes on as a bad id (-1), in the kernels and the torch
    steps alike."""
    x, w, bias = make_case(3, 8, 64, seed=17, device=device)
    table = torch.tensor([[0, 1], [2**32 + 3, 5], [4, -(2**33)]], device=device)
    tok = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="hash table rows"):
        route(x, w, token_ids=tok, hash_table=table, k=2, validate=True)
    for fn in (route, routing.route):
        ids, wts = fn(x, w, token_ids=tok, hash_table=table, k=2)
        assert ids.tolist() == [[0, 1], [-1, 5], [4, -1]], fn.__module__
        assert wts[1, 0] == 0 and wts[2, 1] == 0 and torch.isfinite(wts).all()


def test_route_does_not_depend_on_the_batch(device, row_invariant_dot):
    """A token's ids and weights are the same bits in batches of 1, 15, 16, 17 and 33 tokens
    (around the 16-token block), shuffled."""
    x, w, bias = make_case(33, 72, 384, seed=11, device=device)
    ids, wts = route(x, w, bias=bias, k=6)
    g = gen(3)
    for T in (1, 15, 16, 17, 33):
        i = torch.randperm(33, generator=g)[:T].to(device)
        got_ids, got_w = route(x[i], w, bias=bias, k=6)
        assert torch.equal(got_ids, ids[i]) and torch.equal(got_w, wts[i]), f"T={T}"


def test_route_checks_its_arguments(device):
    x, w, bias = make_case(4, 8, 64, seed=1, device=device)
    with pytest.raises(ValueError, match="k must be"):
        route(x, w, k=9)
    with pytest.raises(ValueError, match="hidden size"):
        route(x[:, :32], w)
    ids, wts = route(x[:0], w, k=2)
    assert ids.shape == (0, 2) and wts.shape == (0, 2)


def test_route_without_a_kernel_is_per_token_when_deterministic(monkeypatch):
    import moetile.ops.router as router_mod

    monkeypatch.setattr(router_mod, "use_kernel", lambda device, op: False)
    x, w, bias = make_case(20, 16, 64, seed=4)
    ids, wts = route(x, w, bias=bias, k=3, deterministic=True)
    for t in (0, 7, 19):
        i1, w1 = route(x[t : t + 1], w, bias=bias, k=3, deterministic=True)
        assert torch.equal(i1[0], ids[t]) and torch.equal(w1[0], wts[t])
    check_topk_against_ref(x, w, bias, 3, ids, wts)


def test_router_config_does_not_depend_on_tokens():
    for interp in (False, True):
        cfg = schedule.router_config(4096, interp)
        assert cfg.h_chunk % cfg.block_k == 0
        assert schedule.router_config(96, interp).h_chunk % cfg.block_k == 0
