"""mul_mv_id (the decode mat-vec) against the float64 reference, and its input checks: the same
validation as mul_mm_id, so no argument can make the kernel read or write outside its tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rows_close

from moetile import schedule
from moetile.ops.act_quant import act_layout, quantize_act
from moetile.ops.mul_mv_id import mul_mv_id
from moetile.quant import random_blocks
from moetile.quant.pack import pack
from moetile.reference import act_dequant_ref, mul_mm_id_ref, swiglu_ref

E, N, K = 5, 80, 512
FORMS = [("Q4_K", "auto"), ("Q2_K", "auto"), ("IQ2_XXS", "fast"), ("IQ2_XXS", "compact"), ("Q8_0", "auto")]
BOUND = 1e-5  # float32 weights and activations vs float64
# q8x2 (two-level int8 activations): vs float64 of the activations it quantized, the products are exact
# integers (bound as f32); vs the activations themselves, the quantization error (~3e-5 measured)
BOUND_Q8X2_X = 2e-4


def _w(qtype, form, device, seed=1):
    return pack(random_blocks(qtype, (E, N, K), generator=torch.Generator().manual_seed(seed)), form).to(device)


def _split(monkeypatch, max_split: int, pairs: int, device: str) -> None:
    """Test-only override of the K-split policy; checks the path asked for is the one taken."""
    monkeypatch.setattr(schedule, "MV_MAX_SPLIT", max_split)
    taken = schedule.mv_split(N, pairs, K, schedule.mv_config(interpreter=device != "cuda"))
    assert (taken > 1) == (max_split > 1), taken


def _seen(x, w, act: str):
    """The activations the kernel multiplies: x itself (f32), or x quantized and read back (q8x2)."""
    if act == "f32":
        return x
    q = quantize_act(x, act_layout(w))
    return act_dequant_ref(q.words, q.scales, q.layout).reshape(x.shape)


@pytest.mark.parametrize("act", ["f32", "q8x2"])
@pytest.mark.parametrize("max_split", [1, 8])
@pytest.mark.parametrize("qtype, form", FORMS)
def test_matches_reference(qtype, form, max_split, act, device, monkeypatch):
    """With and without K cut into chunks (partial sums added by mv_reduce_kernel), float32 and
    two-level int8 activations."""
    _split(monkeypatch, max_split, 6, device)
    w, up = _w(qtype, form, device), _w(qtype, form, device, seed=2)
    g = torch.Generator().manual_seed(0)
    T, k = 3, 2
    ids = torch.tensor([[0, 4], [4, 2], [1, 1]], dtype=torch.int32).to(device)
    x = torch.randn(T, K, generator=g).to(device)
    xs = _seen(x, w, act)
    out = torch.full((T, k, N), float("nan"), device=device)
    mul_mv_id(x, w, ids, out=out, activations=act)
    assert_rows_close(out.cpu(), mul_mm_id_ref(xs, w, ids).cpu(), BOUND, f"{qtype}/{form} {act}")
    if act == "q8x2":
        assert_rows_close(out.cpu(), mul_mm_id_ref(x, w, ids).cpu(), BOUND_Q8X2_X, f"{qtype}/{form} q8x2 vs x")
    rw = torch.rand(T, k, generator=g).to(device)
    fused = mul_mv_id(x, w, ids, w_up=up, route_weights=rw, activations=act)
    ref = swiglu_ref(mul_mm_id_ref(xs, w, ids), mul_mm_id_ref(xs, up, ids), rw.double()[:, :, None])
    assert_rows_close(fused.cpu(), ref.cpu(), BOUND, f"{qtype}/{form} {act} fused")
    # a clamp below most |g|, |u| (x ~ N(0, 1) gives |g| up to ~3 here) must change the result
    tight = mul_mv_id(x, w, ids, w_up=up, route_weights=rw, clamp=0.25, activations=act)
    ref_t = swiglu_ref(mul_mm_id_ref(xs, w, ids), mul_mm_id_ref(xs, up, ids), rw.double()[:, :, None], 0.25)
    assert_rows_close(tight.cpu(), ref_t.cpu(), BOUND, f"{qtype}/{form} {act} fused, clamp 0.25")
    assert not torch.allclose(ref_t, ref, rtol=1e-2)
    xp = torch.randn(T, k, K, generator=g).to(device)  # one row per pair, as down reads mid
    assert_rows_close(mul_mv_id(xp, w, ids, activations=act).cpu(), mul_mm_id_ref(_seen(xp, w, act), w, ids).cpu(),
                      BOUND, f"{act} per pair")


@pytest.mark.parametrize("qtype, form", FORMS)
def test_q8x2_nan_and_scale_stay_in_their_token(qtype, form, device):
    """A NaN input poisons only its token's rows; inputs 1e6 apart in scale keep their own blocks."""
    w = _w(qtype, form, device)
    x = torch.randn(3, K)
    x[0, 7] = float("nan")
    x[2] *= 1e-6
    x[1, :256] *= 1e4
    x = x.to(device)
    ids = torch.tensor([[0, 4], [4, 2], [1, 1]], dtype=torch.int32).to(device)
    out = mul_mv_id(x, w, ids, activations="q8x2").cpu()
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1:]).any()
    assert_rows_close(out[1:], mul_mm_id_ref(x[1:], w, ids[1:]).cpu(), BOUND_Q8X2_X, f"{qtype}/{form} scales")


@pytest.mark.parametrize("act", ["f32", "q8x2"])
@pytest.mark.parametrize("max_split", [1, 8])
def test_bad_ids_nan_rows_or_error(max_split, act, device, monkeypatch):
    _split(monkeypatch, max_split, 4, device)
    w = _w("Q4_K", "auto", device)
    x = torch.randn(2, K).to(device)
    big = torch.tensor([[2**32 + 1, 1], [-1, 3]], dtype=torch.int64).to(device)  # 2^32+1 must not become 1
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*token 0, slot 0"):
        mul_mv_id(x, w, big)
    out = mul_mv_id(x, w, big, validate=False, activations=act).cpu()
    assert torch.isnan(out[0, 0]).all() and torch.isnan(out[1, 0]).all()
    ok = torch.tensor([[1, 1], [3, 3]], dtype=torch.int32).to(device)
    ref = mul_mm_id_ref(_seen(x, w, act), w, ok).cpu()
    assert_rows_close(out[:, 1], ref[:, 1], BOUND)
    # int32 ids out of range reach the kernel as they are (no launches to map them): NaN rows too
    out32 = mul_mv_id(x, w, torch.tensor([[5, 1], [-1, 3]], dtype=torch.int32).to(device), validate=False,
                      activations=act).cpu()
    assert torch.isnan(out32[:, 0]).all() and torch.equal(out32[:, 1], out[:, 1])
    fused = mul_mv_id(x, w, big, w_up=w, route_weights=torch.ones(2, 2, device=device), validate=False,
                      activations=act).cpu()
    assert torch.isnan(fused[0, 0]).all() and torch.isnan(fused[1, 0]).all(), "a bad id's fused row must be NaN"
    assert not torch.isnan(fused[:, 1]).any()


@pytest.mark.parametrize(
    "make, err, match",
    [
        # float ids are refused, not truncated (1.7 is not expert 1)
        (lambda w, d: (torch.randn(2, K, device=d), w, torch.full((2, 1), 1.7, device=d)), TypeError, "int32/int64"),
        # an rhs with K/2 columns would be read past its end
        (lambda w, d: (torch.randn(2, K // 2, device=d), w, torch.zeros(2, 1, dtype=torch.int32, device=d)),
         ValueError, r"must be \(2, 512\)"),
        # a transposed (non-contiguous) rhs would be read with the wrong strides
        (lambda w, d: (torch.randn(K, 2, device=d).T, w, torch.zeros(2, 1, dtype=torch.int32, device=d)),
         ValueError, "contiguous"),
        (lambda w, d: (torch.randn(2, K, device=d), w, torch.zeros(2, 0, dtype=torch.int32, device=d)),
         ValueError, "k = 0"),
        (lambda w, d: (torch.randn(2, K, device=d).int(), w, torch.zeros(2, 1, dtype=torch.int32, device=d)),
         TypeError, "float32/float16/bfloat16"),
    ],
)
def test_bad_inputs(make, err, match, device):
    with pytest.raises(err, match=match):
        mul_mv_id(*make(_w("Q2_K", "auto", device), device))


def test_bad_out_and_fused_arguments(device):
    w = _w("Q4_K", "auto", device)
    x = torch.randn(3, K).to(device)
    ids = torch.zeros(3, 2, dtype=torch.int32).to(device)
    with pytest.raises(ValueError, match="out must be"):  # fewer rows than T*k: would be written past
        mul_mv_id(x, w, ids, out=torch.empty(2, 2, N, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        mul_mv_id(x, w, ids, out=torch.empty(3, N, 2, device=device).transpose(1, 2))
    with pytest.raises(ValueError, match="route_weights"):
        mul_mv_id(x, w, ids, w_up=w)
    with pytest.raises(ValueError, match="w_up"):
        mul_mv_id(x, w, ids, w_up=_w("Q2_K", "auto", device), route_weights=torch.ones(3, 2, device=device))
    with pytest.raises(ValueError, match="only used with w_up"):
        mul_mv_id(x, w, ids, route_weights=torch.ones(3, 2, device=device))
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clamp must be a finite number > 0"):
            mul_mv_id(x, w, ids, w_up=w, route_weights=torch.ones(3, 2, device=device), clamp=bad)
    with pytest.raises(ValueError, match="activations must be one of"):
        mul_mv_id(x, w, ids, activations="int8")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype, form", FORMS)
def test_q8x2_asm_matches_twin_gpu(qtype, form):
    """The dp4a decoders (PTX) and their plain-tl twins give the same bits, at DS4's K and the
    policy's shapes, fused and not."""
    from moetile.ops.mul_mv_id import launch_mv

    g = torch.Generator().manual_seed(3)
    w = pack(random_blocks(qtype, (4, 64, 4096), generator=g), form).to("cuda")
    up = pack(random_blocks(qtype, (4, 64, 4096), generator=g), form).to("cuda")
    x = (torch.randn(3, 4096, generator=g) * torch.rand(3, 4096, generator=g).pow(3)).cuda()
    ids = torch.tensor([0, 3, 1, 1, 2, 0], dtype=torch.int32, device="cuda")
    rw = torch.rand(6, generator=g).cuda()
    act = quantize_act(x, act_layout(w))
    outs = []
    for asm in (True, False):
        one = schedule.MVConfig(*schedule._MV_SHAPE_Q_SINGLE[:3], asm=asm)
        fused = schedule.MVConfig(*schedule._MV_SHAPE_Q[:3], asm=asm)
        o1 = torch.full((6, 64), float("nan"), device="cuda")
        o2 = torch.full((6, 64), float("nan"), device="cuda")
        launch_mv(x, w, ids, 2, o1, config=one, act=act)
        launch_mv(x, w, ids, 2, o2, w_up=up, route_weights=rw, config=fused, act=act)
        outs.append((o1, o2))
    for a, b in zip(*outs, strict=True):
        assert not torch.isnan(a).any() and torch.equal(a, b), f"{qtype}/{form}: PTX and twin differ"


@pytest.mark.parametrize("bk", [512, 1024])
@pytest.mark.parametrize("qtype, form", FORMS)
def test_q8x2_k_step_across_scale_blocks(qtype, form, bk, device):
    """A K step of q8x2 may span several 256-blocks: each group of 32 reads its own block's scale."""
    from moetile.ops.mul_mv_id import launch_mv

    k_in = 1024
    w = pack(random_blocks(qtype, (3, 64, k_in), generator=torch.Generator().manual_seed(4)), form).to(device)
    x = torch.randn(2, k_in, generator=torch.Generator().manual_seed(5)).to(device)
    ids = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32).to(device)
    act = quantize_act(x, act_layout(w))
    out = torch.full((4, 64), float("nan"), device=device)
    launch_mv(x, w, ids.reshape(-1), 2, out, act=act, config=schedule.MVConfig(16, bk, 2, asm=device == "cuda"))
    assert_rows_close(out.view(2, 2, 64).cpu(), mul_mm_id_ref(_seen(x, w, "q8x2"), w, ids).cpu(), BOUND, f"bk={bk}")


def test_iq2_fast_k_step_of_32_is_refused(device):
    """IQ2_XXS fast keeps two 32-groups' scales in one byte: a K step of 32 would read the wrong half."""
    from moetile.ops.mul_mv_id import launch_mv

    w = pack(random_blocks("IQ2_XXS", (2, 16, 256), generator=torch.Generator().manual_seed(1)), "fast").to(device)
    x = torch.randn(1, 256).to(device)
    out = torch.full((1, 16), float("nan"), device=device)
    with pytest.raises(ValueError, match="multiple of 64"):
        launch_mv(x, w, torch.zeros(1, dtype=torch.int32, device=device), 1, out,
                  config=schedule.MVConfig(16, 32, 2, asm=False))


@pytest.mark.parametrize("act", ["f32", "q8x2"])
def test_row_tail_in_a_later_program(act, device):
    """N = 80 rows at 64 a program: the second program holds the 16-row tail (the interpreter's own
    shape takes all 80 in one)."""
    from moetile.ops.mul_mv_id import launch_mv

    w = _w("Q4_K", "auto", device)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(3)).to(device)
    ids = torch.tensor([3, 0, 1, 3], dtype=torch.int32).to(device)
    act_q = quantize_act(x, act_layout(w)) if act == "q8x2" else None
    out = torch.full((4, N), float("nan"), device=device)
    launch_mv(x, w, ids, 2, out, act=act_q, config=schedule.MVConfig(64, 256, 2, asm=device == "cuda"), split=False)
    ref = mul_mm_id_ref(_seen(x, w, act), w, ids.view(2, 2)).reshape(4, N)
    assert_rows_close(out.cpu(), ref.cpu(), BOUND, f"{act}")
