"""The DS4 MoE layer against the float64 whole-layer reference (small shapes on CPU through the
interpreter; DS4 shapes on the GPU)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import row_rel_err

from moetile import routing, schedule
from moetile.moe import DS4MoE, MoEWeights, moe_forward
from moetile.quant import random_blocks
from moetile.reference import ds4_moe_ref, shared_ref
from moetile.reference_routing import route_ref

# prefill: f16 operands as in the reference with round_f16=True; f32 accumulation order and an
# occasional different f16 rounding of mid (one ulp, 2^-11) are all that differ
BOUND_PREFILL = 1e-3
# decode vs float64: its default two-level int8 activations (q8x2; ~5e-5 measured), and float32 throughout
BOUND_DECODE = 2e-4
BOUND_DECODE_F32 = 1e-5
E, H, F, K_TOP = 8, 256, 256, 3


def make_weights(gq, dq, device, *, shared=True, seed=0, E=E, H=H, F=F, k=K_TOP, hash_rows=0):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if shared:
        kw = dict(shared_gate=random_blocks("Q8_0", (F, H), g), shared_up=random_blocks("Q8_0", (F, H), g),
                  shared_down=random_blocks("Q8_0", (H, F), g))
    if hash_rows:
        kw["hash_table"] = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(hash_rows)]).to(torch.int32)
    w = MoEWeights(random_blocks(gq, (E, F, H), g), random_blocks(gq, (E, F, H), g), random_blocks(dq, (E, H, F), g),
                   router=(torch.randn(E, H, generator=g) * 0.1).half(), bias=torch.rand(E, generator=g) * 0.05,
                   top_k=k, **kw)
    return w.to(device)


MODELS = {"q2": ("IQ2_XXS", "Q2_K"), "q4": ("Q4_K", "Q4_K")}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("T, tile", [(9, 16), (33, 32), (70, 64), (3, 128), (130, "auto")])
def test_prefill_matches_reference(model, T, tile, device):
    w = make_weights(*MODELS[model], device)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(device) * 3
    for gu in ("fused", "split"):
        out = moe_forward(x, w, tile=tile, path="prefill", gate_up=gu)
        assert not torch.isnan(out).any()
        ref = ds4_moe_ref(x, w, round_f16=True)
        err = row_rel_err(out.cpu(), ref.cpu())
        assert err.max() < BOUND_PREFILL, f"{model} T={T} tile={tile} {gu}: {err.max():.2e}"
        assert row_rel_err(out.cpu(), ds4_moe_ref(x, w).cpu()).max() < 1e-2


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("gate_up", ["auto", "fused", "split"])
def test_two_width_plan_on_skewed_routing(model, gate_up, device):
    """One expert crowded (every token's slot 0), the others sparse: the auto plan gives the crowded
    expert wide tiles and the rest narrow ones; with fused gate/up the narrow class is fused and the
    wide one split (the SwiGLU pass then writes only the wide class's rows)."""
    w = make_weights(*MODELS[model], device, shared=False)
    T, k = 40, 2
    g = torch.Generator().manual_seed(3)
    ids = torch.empty(T, k, dtype=torch.int32)
    ids[:, 0] = 5
    other = torch.randint(0, E - 1, (T,), generator=g, dtype=torch.int32)
    ids[:, 1] = torch.where(other >= 5, other + 1, other)
    rw = torch.rand(T, k, generator=g) + 0.1
    x = torch.randn(T, H, generator=g) * 3
    plan = schedule.plan_layer(T, k, E, schedule.form_key(w.packed().gate), gate_up=gate_up)
    assert (plan.width, plan.wide, plan.wide_rows) == (16, 256, 33)
    ids, rw, x = ids.to(device), rw.to(device), x.to(device)
    out = moe_forward(x, w, topk_ids=ids, topk_weights=rw, path="prefill", gate_up=gate_up)
    ref = ds4_moe_ref(x, w, topk_ids=ids, topk_weights=rw, round_f16=True)
    err = row_rel_err(out.cpu(), ref.cpu())
    assert err.max() < BOUND_PREFILL, f"{model} {gate_up}: {err.max():.2e}"


@pytest.mark.parametrize("act", ["auto", "f32", "q8x2"])
@pytest.mark.parametrize("model", MODELS)
def test_decode_matches_reference(model, act, device):
    w = make_weights(*MODELS[model], device)
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(5)).to(device) * 3
    out = moe_forward(x, w, path="decode", decode_act=act)
    err = row_rel_err(out.cpu(), ds4_moe_ref(x, w).cpu())
    assert err.max() < (BOUND_DECODE_F32 if act == "f32" else BOUND_DECODE), f"{act}: {err.max():.2e}"
    if act == "f32":
        assert not torch.equal(out, moe_forward(x, w, path="decode", decode_act="q8x2")), "the switch did nothing"
    with pytest.raises(ValueError, match="decode_act"):
        moe_forward(x, w, path="decode", decode_act="int8")


def test_router_selection_matches_reference(device):
    w = make_weights("Q4_K", "Q4_K", device)
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(1)).to(device)
    ids, rw = routing.route(x, w.router, bias=w.bias, k=K_TOP)
    ids_ref, rw_ref = route_ref(x.cpu(), w.router.cpu(), bias=w.bias.cpu(), k=K_TOP)
    assert torch.equal(ids.cpu(), ids_ref)
    assert torch.allclose(rw.cpu().double(), rw_ref, rtol=1e-5)


def test_hash_layer_and_token_ids(device):
    w = make_weights("Q4_K", "Q4_K", device, hash_rows=50)
    x = torch.randn(12, H).to(device)
    tok = torch.randint(0, 50, (12,)).to(device)
    out = moe_forward(x, w, tok, path="prefill", tile=16)
    ref = ds4_moe_ref(x, w, tok, round_f16=True)
    assert row_rel_err(out.cpu(), ref.cpu()).max() < BOUND_PREFILL
    with pytest.raises((ValueError, TypeError), match="token_ids"):
        moe_forward(x, w)  # hash layer without token ids
    with pytest.raises(ValueError, match="outside"):
        moe_forward(x, w, torch.full((12,), 50, device=device))


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_hash_entry_outside_the_experts(path, device):
    """Kernels, reference and routing agree on a table entry >= E: an error with validate=True;
    without validation that token's output is NaN and no other token's. (A GGUF layer with such a
    table is refused at load: tests/test_gguf_io.py.)"""
    w = make_weights("Q4_K", "Q4_K", device, hash_rows=50)
    w.hash_table[7, 1] = E
    T = 3 if path == "decode" else 12
    tok = torch.arange(T).to(device) + 5  # token 2 reads row 7
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(8)).to(device)
    with pytest.raises(ValueError, match=f"expert id {E}"):
        moe_forward(x, w, tok, path=path, validate=True)
    out = moe_forward(x, w, tok, path=path, validate=False).cpu()
    ref = ds4_moe_ref(x, w, tok, round_f16=path == "prefill").cpu()
    nan_rows = torch.isnan(out).any(1)
    assert nan_rows.tolist() == [t == 2 for t in range(T)]
    assert torch.equal(torch.isnan(ref).any(1), nan_rows)
    keep = ~nan_rows
    assert row_rel_err(out[keep], ref[keep]).max() < (BOUND_PREFILL if path == "prefill" else BOUND_DECODE)

@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_int64_ids_beyond_int32_do_not_wrap(path, device):
    """topk_ids given as int64 with validate=False: 2**32 + e is outside [0, E), so that token's row is
    NaN, never expert e's result (a cast to int32 first would wrap it)."""
    w = make_weights("Q4_K", "Q4_K", device, shared=False)
    T = 3 if path == "decode" else 12
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(9)).to(device)
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:2] for t in range(T)]).to(device)
    rw = torch.rand(T, 2, generator=torch.Generator().manual_seed(10)).to(device)
    bad = ids.clone()
    bad[1, 0] += 1 << 32
    out = moe_forward(x, w, topk_ids=bad, topk_weights=rw, path=path, validate=False).cpu()
    good = moe_forward(x, w, topk_ids=ids, topk_weights=rw, path=path, validate=False).cpu()
    assert torch.isnan(out).any(1).tolist() == [t == 1 for t in range(T)]
    assert torch.allclose(out[0], good[0], rtol=1e-5, atol=1e-6)  # the other tokens: as without the bad id


def test_bypass_router_and_no_shared(device):
    w = make_weights("IQ2_XXS", "Q2_K", device, shared=False)
    T = 20
    ids = torch.rand(T, E).topk(2, dim=1).indices.to(torch.int32).to(device)
    rw = torch.rand(T, 2).to(device)
    out = moe_forward(torch.randn(T, H).to(device), w, topk_ids=ids, topk_weights=rw, tile=16)
    assert out.shape == (T, H) and not torch.isnan(out).any()
    x = torch.randn(T, H).to(device)
    out = moe_forward(x, w, topk_ids=ids, topk_weights=rw, tile=16)
    ref = ds4_moe_ref(x, w, topk_ids=ids, topk_weights=rw, round_f16=True)
    assert row_rel_err(out.cpu(), ref.cpu()).max() < BOUND_PREFILL


@pytest.mark.gpu
def test_deterministic_bitwise():
    """Repeated runs on the GPU give the same bits (no atomics, fixed-order sums), whatever order
    the SMs pick tiles in. (Through the interpreter the check would compare a run with itself.)"""
    w = make_weights("Q4_K", "Q4_K", "cuda")
    x = torch.randn(400, H, device="cuda")
    runs = [moe_forward(x, w) for _ in range(5)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])


def test_nan_stays_in_its_token(device):
    w = make_weights("Q4_K", "Q4_K", device)
    x = torch.randn(10, H).to(device)
    clean = moe_forward(x, w, tile=16, path="prefill")
    x[3, 7] = float("nan")
    out = moe_forward(x, w, tile=16, path="prefill")
    assert torch.isnan(out[3]).all()
    keep = torch.arange(10, device=device) != 3
    assert torch.equal(out[keep], clean[keep])


@pytest.mark.parametrize("plan", [dict(path="prefill", gate_up="fused"), dict(path="prefill", gate_up="split"),
                                  dict(path="decode", decode_act="q8x2"), dict(path="decode", decode_act="f32")])
def test_nan_in_x_reaches_its_tokens_output_with_given_routing(plan, device):
    """With the routing given (no router to turn the NaN into NaN weights), a NaN in x must still
    reach every element of its token's output: the SwiGLU clamps keep it instead of making it +-C."""
    w = make_weights("Q4_K", "Q4_K", device, shared=False)
    T = 3 if plan["path"] == "decode" else 10
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(11)).to(device)
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(20 + t))[:2]
                       for t in range(T)]).to(torch.int32).to(device)
    rw = torch.rand(T, 2, generator=torch.Generator().manual_seed(12)).to(device) + 0.1
    clean = moe_forward(x, w, topk_ids=ids, topk_weights=rw, tile=16, **plan)
    x[1, 5] = float("nan")
    out = moe_forward(x, w, topk_ids=ids, topk_weights=rw, tile=16, **plan)
    assert torch.isnan(out[1]).all()
    keep = torch.arange(T, device=device) != 1
    assert torch.equal(out[keep], clean[keep])


def test_module_and_bad_inputs(device):
    w = make_weights("Q4_K", "Q4_K", device)
    m = DS4MoE(w, tile=16)
    assert "E=8" in repr(m)
    with pytest.raises(ValueError, match="H = 256"):
        m(torch.randn(4, H + 1).to(device))
    with pytest.raises(TypeError, match="float32"):
        m(torch.ones(4, H, dtype=torch.int32).to(device))
    with pytest.raises(ValueError, match="same quant type"):
        MoEWeights(w.gate, random_blocks("IQ2_XXS", (E, F, H)).to(device), w.down)
    with pytest.raises(ValueError, match="expert shapes"):
        MoEWeights(w.gate, w.up, random_blocks("Q4_K", (E, H, 2 * F)).to(device))
    with pytest.raises(ValueError, match="topk_weights"):
        moe_forward(torch.randn(2, H).to(device), w, topk_ids=torch.zeros(2, 3, dtype=torch.int32).to(device))
    with pytest.raises(ValueError, match="outside"):
        moe_forward(torch.randn(2, H).to(device), w, topk_ids=torch.full((2, 3), E, dtype=torch.int32).to(device),
                    topk_weights=torch.ones(2, 3).to(device))
    with pytest.raises(ValueError, match="path"):
        moe_forward(torch.randn(2, H).to(device), w, path="fast")
    for bad in (torch.zeros(2, dtype=torch.int32), [[0, 1, 2], [1, 2, 3]]):  # checked before any use
        with pytest.raises(TypeError, match=r"\[T, k\]"):
            moe_forward(torch.randn(2, H).to(device), w, topk_ids=bad if isinstance(bad, list) else bad.to(device),
                        topk_weights=torch.ones(2, 3).to(device), path="decode")


def test_gate_up_forms_and_override_checks(device):
    """gate and up (and the shared gate and up) are read by one decoder: a different packed form is
    refused, not decoded as garbage; topk_ids/topk_weights on another device or of a non-float type and
    a bad plan override are refused on every path (T = 0 too) and by the module's constructor."""
    from moetile.quant.pack import pack

    iq = make_weights("IQ2_XXS", "Q2_K", device)
    with pytest.raises(ValueError, match="same form"):
        replace(iq, gate=pack(iq.gate, "fast"), up=pack(iq.up, "compact"))
    sg, su = (random_blocks("IQ2_XXS", (F, H)).to(device) for _ in range(2))
    with pytest.raises(ValueError, match="same form"):
        replace(iq, shared_gate=pack(sg, "fast"), shared_up=pack(su, "compact"))
    replace(iq, shared_gate=pack(sg, "compact"), shared_up=pack(su, "compact"))  # alike: accepted
    from moetile.ops.mul_mv_id import launch_mv

    with pytest.raises(ValueError, match="launch_mv: up is IQ2_XXS/compact"):  # the launcher checks too
        launch_mv(torch.randn(1, H).to(device), pack(iq.gate, "fast"), torch.zeros(1, dtype=torch.int32).to(device),
                  1, torch.empty(1, F).to(device), w_up=pack(iq.up, "compact"), route_weights=torch.ones(1).to(device))
    w = make_weights("Q4_K", "Q4_K", device)
    with pytest.raises(ValueError, match="same quant type"):
        replace(w, shared_up=random_blocks("Q4_K", (F, H)).to(device))
    with pytest.raises(TypeError, match="shared_gate"):
        replace(w, shared_gate=torch.randn(F, H).to(device))
    with pytest.raises(TypeError, match="router must be a tensor"):
        replace(w, router=[[0.0] * H] * E)
    x = torch.randn(2, H).to(device)
    ids, tw = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32).to(device), torch.rand(2, 3).to(device)
    for bad_ids, bad_w in ((ids.to("meta"), tw), (ids, tw.to("meta"))):
        with pytest.raises(ValueError, match="x's device"):
            moe_forward(x, w, topk_ids=bad_ids, topk_weights=bad_w)
    with pytest.raises(TypeError, match="float tensor"):
        moe_forward(x, w, topk_ids=ids, topk_weights=torch.ones(2, 3, dtype=torch.int32).to(device))
    for T in (0, 2):
        for kw, match in (({"path": "bogus"}, "path"), ({"tile": 48}, "tile width"), ({"tile": True}, "tile"),
                          ({"gate_up": "x"}, "gate_up"), ({"decode_act": "int4"}, "decode_act")):
            with pytest.raises((ValueError, TypeError), match=match):
                moe_forward(x[:T], w, **kw)
    with pytest.raises(ValueError, match="path"):
        DS4MoE(w, path="bogus")


def test_a_bad_override_is_refused_by_the_torch_fallback(monkeypatch):
    """Without a kernel (CPU tensors, no interpreter) the layer runs the reference; a bad override
    is still an error there, not ignored."""
    import moetile.moe

    monkeypatch.setattr(moetile.moe, "use_kernel", lambda device, op: False)
    w = make_weights("Q4_K", "Q4_K", "cpu")
    with pytest.raises(ValueError, match="decode_act"):
        moe_forward(torch.randn(2, H), w, decode_act="fp8")
    monkeypatch.setenv("MOETILE_TILE_MAX", "48")
    with pytest.raises(ValueError, match="MOETILE_TILE_MAX"):
        moe_forward(torch.randn(0, H), w)


def test_shared_expert_constants_outlive_growth():
    """A CUDA graph captured with views of the shared expert's constant ids and weights reads them at
    every replay: growing them for a longer batch keeps the old buffers alive (and their values)."""
    import moetile.moe

    dev = torch.device("cpu")
    moetile.moe._EXPERT0.pop(dev, None)
    ids, w = moetile.moe._expert0_weight1(3, dev)
    ptr = ids.data_ptr()
    big_ids, big_w = moetile.moe._expert0_weight1(1000, dev)
    assert big_ids.shape == (1000, 1) and big_w.shape == (1000, 1)
    assert (big_ids == 0).all() and (big_w == 1).all() and big_ids.dtype == torch.int32
    assert any(i.data_ptr() == ptr for i, _ in moetile.moe._EXPERT0[dev])  # still held
    assert moetile.moe._expert0_weight1(2, dev)[0].data_ptr() == big_ids.data_ptr()  # the largest serves all


def _capture(fn):
    """(graph, its output): ``fn`` warmed up on a side stream (compiles, allocates), then captured."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
def test_graph_replay_after_a_longer_eager_batch():
    """Capture a decode step, then run an eager batch longer than any before (the shared expert's
    constants grow) and churn the allocator: the replay still gives the eager bits."""
    import moetile.moe

    w = make_weights("IQ2_XXS", "Q2_K", "cuda", E=32, H=1024, F=512, k=6).packed()
    layer = DS4MoE(w, validate=False)
    x = torch.randn(1, 1024, device="cuda")
    want = layer(x)
    graph, out = _capture(lambda: layer(x))
    made = moetile.moe._EXPERT0.get(x.device, [])
    longer = (made[-1][0].shape[0] if made else 64) + 1
    layer(torch.randn(longer, 1024, device="cuda"))
    junk = [torch.full((n, 1), 7, dtype=torch.int32, device="cuda") for n in (64, 128, 256, 512, 1024, longer)]
    out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(out, want)
    del junk


def test_zero_tokens(device):
    w = make_weights("Q4_K", "Q4_K", device)
    assert moe_forward(torch.randn(0, H).to(device), w).shape == (0, H)


def test_from_gguf_round_trip(tmp_path, device):
    from moetile.gguf_io import MoELayerTensors, write_moe_layers

    w = make_weights("IQ2_XXS", "Q2_K", "cpu")
    lt = MoELayerTensors(w.gate, w.up, w.down, w.router, w.bias, None, w.shared_gate, w.shared_up, w.shared_down)
    path = tmp_path / "layer.gguf"
    write_moe_layers(path, {0: lt}, metadata={"deepseek4.expert_used_count": K_TOP})
    m = DS4MoE.from_gguf(path, 0, device=device, tile=16)
    x = torch.randn(20, H).to(device)
    ref = ds4_moe_ref(x, w.to(device), round_f16=True)
    assert row_rel_err(m(x).cpu(), ref.cpu()).max() < BOUND_PREFILL


CLAMP = 0.5  # about half the gate/up values of these layers lie above it: a kernel that ignores it fails


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path, gate_up", [("prefill", "fused"), ("prefill", "split"), ("decode", "auto")])
def test_swiglu_clamp_is_honoured(model, path, gate_up, device):
    w = replace(make_weights(*MODELS[model], device), clamp=CLAMP)
    T = 2 if path == "decode" else 33
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(device) * 3
    out = moe_forward(x, w, path=path, gate_up=gate_up, tile=16 if path == "prefill" else "auto")
    prefill = path == "prefill"
    ref = ds4_moe_ref(x, w, round_f16=prefill)
    assert row_rel_err(out.cpu(), ref.cpu()).max() < (BOUND_PREFILL if prefill else BOUND_DECODE)
    unclamped = ds4_moe_ref(x, replace(w, clamp=10.0), round_f16=prefill)
    assert row_rel_err(unclamped.cpu(), ref.cpu()).min() > 100 * BOUND_PREFILL  # the clamp bites every row


def test_bad_clamp_is_refused():
    w = make_weights("Q4_K", "Q4_K", "cpu")
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="clamp must be a finite number > 0"):
            replace(w, clamp=bad)


def _file_with(tmp_path, **cfg):
    from moetile.gguf_io import MoEConfig, MoELayerTensors, write_moe_layers

    w = make_weights("IQ2_XXS", "Q2_K", "cpu")
    lt = MoELayerTensors(w.gate, w.up, w.down, w.router, w.bias, None, w.shared_gate, w.shared_up, w.shared_down)
    base = dict(expert_count=E, expert_used_count=K_TOP, expert_shared_count=1, block_count=3)
    path = tmp_path / "layer.gguf"
    write_moe_layers(path, {0: lt, 1: lt}, MoEConfig(**{**base, **cfg}))
    return path, w


def test_from_gguf_reads_the_layers_clamp_and_scale(tmp_path, device):
    path, w = _file_with(tmp_path, swiglu_clamp_exp=[10.0, CLAMP, 10.0], expert_weights_scale=0.75)
    m = DS4MoE.from_gguf(path, 1, device=device, tile=16)
    assert (m.weights.clamp, m.weights.scale, m.weights.top_k) == (CLAMP, 0.75, K_TOP)
    assert DS4MoE.from_gguf(path, 0, device=device).weights.clamp == 10.0
    x = torch.randn(20, H, generator=torch.Generator().manual_seed(4)).to(device) * 3
    ref = ds4_moe_ref(x, replace(w, clamp=CLAMP, scale=0.75).to(device), round_f16=True)
    assert row_rel_err(m(x).cpu(), ref.cpu()).max() < BOUND_PREFILL
    # a scale of 0 is a value, not "absent": the routed experts then add nothing
    path0, _ = _file_with(tmp_path, expert_weights_scale=0.0)
    m0 = DS4MoE.from_gguf(path0, 0, device=device)
    assert m0.weights.scale == 0.0
    shared_only = ds4_moe_ref(x, replace(w, scale=0.0).to(device), round_f16=True)
    assert row_rel_err(m0(x).cpu(), shared_only.cpu()).max() < BOUND_PREFILL


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(expert_group_count=4, expert_group_used_count=2), "expert_group_count = 4: group-limited routing"),
        (dict(expert_weights_norm=False), "expert_weights_norm = false"),
        (dict(expert_used_count=0), r"expert_used_count = 0 must be in \[1"),
        (dict(expert_used_count=E + 1), rf"expert_used_count = {E + 1} must be in \[1"),
        (dict(swiglu_clamp_exp=[10.0]), r"swiglu_clamp_exp holds 1 per-layer values; none is layer 1"),
        (dict(swiglu_clamp_exp=0.0), r"swiglu_clamp_exp = 0.0 for this layer"),
        (dict(expert_weights_scale=float("inf")), "expert_weights_scale = inf is not finite"),
    ],
)
def test_from_gguf_refuses_what_it_cannot_honour(tmp_path, cfg, match):
    from moetile.gguf_io import GGUFError

    path, _ = _file_with(tmp_path, **cfg)
    with pytest.raises(GGUFError, match=match):
        DS4MoE.from_gguf(path, 1)


@pytest.mark.parametrize(
    "key, value, stored",
    [
        ("deepseek4.expert_weights_scale", 1069547520, "UINT32"),  # the bits of 1.5f, read as a count
        ("deepseek4.expert_count", 8.0, "FLOAT32"),
        ("deepseek4.expert_weights_norm", 1, "UINT32"),
        ("deepseek4.swiglu_clamp_exp", "10", "STRING"),
        ("deepseek4.swiglu_clamp_exp", [10, 10], "ARRAY/UINT32"),
        ("deepseek4.expert_used_count", -3, "INT32"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused(tmp_path, key, value, stored):
    from moetile.gguf_io import GGUFError, MoELayerTensors, open_gguf, write_gguf

    w = make_weights("Q4_K", "Q4_K", "cpu", shared=False)
    lt = MoELayerTensors(w.gate, w.up, w.down, w.router, w.bias)
    path = tmp_path / "t.gguf"
    write_gguf(path, lt.to_tensors(0), {key: value})
    want = "is negative" if stored == "INT32" else f"stored as {stored}; moetile reads it as"
    with pytest.raises(GGUFError, match=rf"'{key}' .*{want}" if stored != "INT32" else want):
        open_gguf(path).moe_config()
    with pytest.raises(GGUFError):
        DS4MoE.from_gguf(path, 0)


# ----------------------------------------------------------------------------- GPU, DS4 shapes
@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_ds4_layer_gpu(model):
    w = make_weights(*MODELS[model], "cuda", E=256, H=4096, F=2048, k=6).packed()
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in (1, 6, 32, 512, 2048, 8192):
        x = torch.randn(T, 4096, device="cuda", generator=g)
        out = moe_forward(x, w)
        assert not torch.isnan(out).any()
        s = torch.randperm(T, device="cuda", generator=g)[:16].sort().values
        ids, rw = routing.route(x, w.router, bias=w.bias, k=6)
        # the routed and the shared experts plan their paths apart (the shared expert's mat-vec stops
        # at a smaller T): each part of the reference rounds as its path does
        decode = schedule.plan_layer(T, 6, 256, schedule.form_key(w.gate)).path == "decode"
        shared_decode = schedule.plan_layer(T, 1, 1, schedule.form_key(w.shared_gate)).path == "decode"
        ref = ds4_moe_ref(x[s], w, topk_ids=ids[s], topk_weights=rw[s], include_shared=False,
                          round_f16=not decode) + shared_ref(x[s], w, round_f16=not shared_decode)
        err = row_rel_err(out[s], ref).max().item()
        bound = BOUND_DECODE if decode and shared_decode else BOUND_PREFILL
        assert err < bound, f"{model} T={T} (routed {'decode' if decode else 'prefill'}, shared " \
                            f"{'decode' if shared_decode else 'prefill'}): {err:.2e}"


# ----------------------------------------------------------------------------- deterministic mode
def _batches(n_base: int, seed: int):
    """Index lists into a pool of tokens: one token alone (the decode size), small and large
    batches of other sizes, in shuffled orders, with tokens of the pool's far end mixed in."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(n_base, generator=g)
    return [pool[:1], pool[:5].flip(0), torch.randperm(n_base, generator=g)[:40], torch.randperm(n_base, generator=g)]


@pytest.mark.parametrize("model", MODELS)
def test_deterministic_output_does_not_depend_on_the_batch(model, device, monkeypatch, row_invariant_dot):
    """With deterministic=True a token's output row is the same bits whatever batch it is in (T = 1,
    5, 40, 70: the default plan changes path and width across these), in whatever position, and
    still matches the reference. Buffers are poisoned (conftest), so an unwritten row cannot pass."""
    w = make_weights(*MODELS[model], device)
    pool = torch.randn(70, H, generator=torch.Generator().manual_seed(5)).to(device) * 3
    seen = {}
    for idx in _batches(70, seed=1):
        out = moe_forward(pool[idx.to(device)], w, deterministic=True)
        for row, t in enumerate(idx.tolist()):
            if t in seen:
                assert torch.equal(out[row], seen[t]), f"{model}: token {t} changed with the batch (T={len(idx)})"
            seen[t] = out[row]
    got = torch.stack([seen[t] for t in range(70)])
    assert row_rel_err(got.cpu(), ds4_moe_ref(pool, w, round_f16=True).cpu()).max() < BOUND_PREFILL
    # the module and the environment switch take the same plan
    monkeypatch.setenv(schedule.DETERMINISTIC_ENV, "1")
    assert torch.equal(DS4MoE(w)(pool[:1]), seen[0].view(1, H))
    assert torch.equal(moe_forward(pool[:1], w), seen[0].view(1, H))


def test_deterministic_decode_path_does_not_split_by_batch(device, row_invariant_dot, monkeypatch):
    """A forced mat-vec path stays batch-invariant under deterministic=True: the K split, whose chunk
    count follows the number of pairs (H = F = 512 lets it cut K in two for small batches), is off."""
    w = make_weights("Q4_K", "Q4_K", device, H=512, F=512)
    n = 70
    if device == "cpu":  # the interpreter's programs hold 256 rows: 20 tokens cross a lower threshold
        monkeypatch.setattr(schedule, "MV_MIN_PROGRAMS", 48)
        n = 20
    pool = torch.randn(n, 512, generator=torch.Generator().manual_seed(6)).to(device)
    cfg = schedule.mv_config(interpreter=device != "cuda", act=schedule.MV_ACT)
    assert schedule.mv_split(512, K_TOP, 512, cfg) > 1  # by default T = 1 would cut K ...
    assert schedule.mv_split(512, n * K_TOP, 512, cfg) == 1  # ... and T = n would not
    assert not schedule.plan_layer(1, K_TOP, E, "Q4_K", path="decode", deterministic=True).mv_split
    full = moe_forward(pool, w, path="decode", deterministic=True)
    for t in (0, n // 2, n - 1):
        one = moe_forward(pool[t : t + 1], w, path="decode", deterministic=True)
        assert torch.equal(one[0], full[t]), f"token {t}"


def test_deterministic_reference_path_is_per_token(monkeypatch):
    """Without a kernel (CPU, no interpreter) deterministic mode computes token by token."""
    import moetile.moe as moe_mod
    import moetile.ops.router as router_mod

    monkeypatch.setattr(moe_mod, "use_kernel", lambda device, op: False)
    monkeypatch.setattr(router_mod, "use_kernel", lambda device, op: False)
    w = make_weights("Q4_K", "Q4_K", "cpu")
    pool = torch.randn(9, H, generator=torch.Generator().manual_seed(2))
    full = moe_forward(pool, w, deterministic=True)
    for t in (0, 4, 8):
        assert torch.equal(moe_forward(pool[t : t + 1], w, deterministic=True)[0], full[t])
    assert row_rel_err(full, ds4_moe_ref(pool, w, round_f16=True)).max() < BOUND_PREFILL


def test_deterministic_switch_is_checked(monkeypatch):
    w = make_weights("Q4_K", "Q4_K", "cpu")
    with pytest.raises(TypeError, match="deterministic"):
        moe_forward(torch.randn(2, H), w, deterministic=1)
    monkeypatch.setenv(schedule.DETERMINISTIC_ENV, "yes")
    with pytest.raises(ValueError, match="MOETILE_DETERMINISTIC"):
        moe_forward(torch.randn(2, H), w)


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_deterministic_batch_invariance_gpu(model):
    """DS4 shapes on the GPU: a token's row is the same bits in batches of 1, 3, 8, 300 and 2048
    tokens (decode and prefill sizes of the default plan), shuffled, and in the skewed batch where
    every token picks the same experts."""
    w = make_weights(*MODELS[model], "cuda", E=256, H=4096, F=2048, k=6).packed()
    g = torch.Generator(device="cuda").manual_seed(0)
    pool = torch.randn(2048, 4096, device="cuda", generator=g)
    full = moe_forward(pool, w, deterministic=True)
    for T in (1, 3, 8, 300, 2047):
        idx = torch.randperm(2048, device="cuda", generator=g)[:T]
        assert torch.equal(moe_forward(pool[idx], w, deterministic=True), full[idx]), f"{model} T={T}"
    dec = moe_forward(pool[:300], w, path="decode", deterministic=True)  # the mat-vec, forced
    for T in (1, 8):
        assert torch.equal(moe_forward(pool[:T], w, path="decode", deterministic=True), dec[:T]), f"decode T={T}"
    ids = torch.arange(6, device="cuda").expand(512, 6).contiguous()  # one crowd of experts
    rw = torch.rand(512, 6, device="cuda", generator=g)
    crowd = moe_forward(pool[:512], w, topk_ids=ids, topk_weights=rw, deterministic=True)
    for t in (0, 17, 511):
        one = moe_forward(pool[t : t + 1], w, topk_ids=ids[t : t + 1], topk_weights=rw[t : t + 1], deterministic=True)
        assert torch.equal(one[0], crowd[t]), f"{model}: token {t} of the crowd"
    ref = ds4_moe_ref(pool[:64], w, round_f16=True)
    assert row_rel_err(full[:64], ref).max().item() < BOUND_PREFILL


# ----------------------------------------------------------------------------- CUDA graphs
@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("T, hashed", [(1, False), (8, False), (300, False), (5, True)])
def test_layer_runs_in_a_cuda_graph(model, T, hashed):
    """DS4MoE(validate=False) forward: no host sync (torch's sync debug mode raises on one), captured
    in a CUDA graph and replayed on new inputs, bit for bit the eager result of those inputs. A
    router layer without a hash table does not sync with validate=True either (README)."""
    w = make_weights(*MODELS[model], "cuda", E=32, H=1024, F=512, k=6, hash_rows=50 if hashed else 0)
    layer = DS4MoE(w, validate=False)
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 1024, device="cuda", generator=g)
    tok = torch.randint(0, 50, (T,), device="cuda", generator=g) if hashed else None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x, tok)  # compile and allocate outside the capture
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x, tok)
            if not hashed:  # with its own router and no hash table, validate=True has nothing to check
                DS4MoE(w)(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, tok)
    for seed in (1, 2):
        x.copy_(torch.randn(T, 1024, device="cuda", generator=g) * seed)
        if hashed:
            tok.copy_(torch.randint(0, 50, (T,), device="cuda", generator=g))
        graph.replay()
        assert torch.equal(out, layer(x, tok)), f"{model} T={T}: replay differs from eager"


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_shared_expert_on_a_side_stream_gives_the_same_bits(model, monkeypatch):
    """In a CUDA graph the shared expert runs on a second stream (schedule.SHARED_ON_SIDE_STREAM): the
    replay gives the eager bits, with the flag on and off, decode and prefill sizes."""
    import moetile.moe

    forks = []
    fork = moetile.moe._shared_on_side_stream
    monkeypatch.setattr(moetile.moe, "_shared_on_side_stream", lambda *a: forks.append(1) or fork(*a))
    w = make_weights(*MODELS[model], "cuda", E=32, H=1024, F=512, k=6).packed()
    layer = DS4MoE(w, validate=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in (1, 8, 300, 2048):
        x = torch.randn(T, 1024, device="cuda", generator=g)
        want = layer(x)
        assert not forks  # eager calls: one stream
        for side in (True, False):
            monkeypatch.setattr(schedule, "SHARED_ON_SIDE_STREAM", side)
            forks.clear()
            graph, out = _capture(lambda x=x: layer(x))
            assert len(forks) == side  # the capture forked (only) when asked
            out.fill_(float("nan"))
            graph.replay()
            assert torch.equal(out, want), f"{model} T={T} side={side}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_layer_on_a_gpu_that_is_not_current():
    """x and the weights on cuda:1 while cuda:0 is current: the kernels launch on x's GPU (Triton
    launches on the current device), the same bits as with cuda:1 current."""
    w = make_weights("Q4_K", "Q4_K", "cuda:1", E=32, H=1024, F=512, k=6).packed()
    x = torch.randn(40, 1024, device="cuda:1")
    with torch.cuda.device(1):
        want, want1 = moe_forward(x, w), moe_forward(x[:1], w)  # prefill and decode paths
    torch.cuda.set_device(0)
    assert torch.equal(moe_forward(x, w), want)
    assert torch.equal(moe_forward(x[:1], w), want1)


# ----------------------------------------------------------------------------- torch.compile
class _Block(torch.nn.Module):
    """A model around the layer: a projection, the MoE layer, a residual."""

    def __init__(self, w):
        super().__init__()
        self.proj = torch.nn.Linear(H, H)
        self.moe = DS4MoE(w)

    def forward(self, x, token_ids=None):
        h = self.proj(x)
        return x + self.moe(h, token_ids)


@pytest.mark.parametrize("hashed", [False, True])
def test_layer_compiles_with_fullgraph(hashed, device):
    """torch.compile(fullgraph=True) traces a model using DS4MoE (one custom op with a fake
    implementation); the compiled model gives the eager result. aot_eager runs the fake
    implementation through AOT autograd without needing a C++ compiler."""
    torch._dynamo.reset()
    w = make_weights("Q4_K", "Q4_K", device, hash_rows=20 if hashed else 0)
    model = _Block(w).to(device)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(4)).to(device)
    tok = torch.arange(6, device=device) if hashed else None
    with torch.no_grad():
        eager = model(x, tok)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x, tok), eager)
        model.moe.weights = make_weights("Q4_K", "Q4_K", device, seed=9, hash_rows=20 if hashed else 0).packed()
        assert torch.equal(compiled(x, tok), model(x, tok)), "the compiled model must use the new weights"


def test_copies_of_a_layer_get_their_own_handle(device):
    """deepcopy and torch.save/load give a layer its own registry entry: a copy's new weights never
    reach the original's compiled graph (and deleting one leaves the other's entry)."""
    import copy
    import io

    from moetile import custom_ops

    layer = DS4MoE(make_weights("Q4_K", "Q4_K", device))
    dup = copy.deepcopy(layer)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert len({layer._handle, dup._handle, loaded._handle}) == 3
    dup.weights = make_weights("Q4_K", "Q4_K", device, seed=3).packed()
    assert custom_ops._LAYERS[layer._handle] is layer.weights and custom_ops._LAYERS[dup._handle] is dup.weights
    handle = dup._handle
    del dup
    import gc

    gc.collect()
    assert handle not in custom_ops._LAYERS and custom_ops._LAYERS[loaded._handle] is loaded.weights


def test_custom_op_fake_and_schema(device):
    """torch.library.opcheck: schema, fake implementation and dispatch of moetile::ds4_moe."""
    layer = DS4MoE(make_weights("Q4_K", "Q4_K", device))
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1)).to(device)
    torch.library.opcheck(torch.ops.moetile.ds4_moe.default,
                          (x, None, layer._handle, "auto", "auto", "auto", False, True, "auto"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_layer_compiles_with_inductor_gpu():
    """The default backend (inductor) on the GPU, with CUDA graphs ("reduce-overhead")."""
    torch._dynamo.reset()
    model = _Block(make_weights("IQ2_XXS", "Q2_K", "cuda", E=32, H=H, F=F, k=6)).cuda()
    x = torch.randn(4, H, device="cuda")
    with torch.no_grad():
        eager = model(x)
        for mode in ("default", "reduce-overhead"):
            compiled = torch.compile(model, fullgraph=True, mode=mode)
            for _ in range(3):  # reduce-overhead records its graph on a later call
                out = compiled(x)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
