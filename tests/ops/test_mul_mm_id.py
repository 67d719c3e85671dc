"""mul_mm_id against the float64 reference: every type x rhs x width x boundary row count.

On CPU the real Triton kernel runs through the interpreter (small shapes); on CUDA the same
tests run, plus DS4 shapes (marked gpu).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_rows_close, row_rel_err

from moetile import schedule
from moetile.ops.mul_mm_id import mul_mm_id, mul_mm_id_mapped
from moetile.quant import random_blocks
from moetile.quant.pack import pack
from moetile.reference import mul_mm_id_ref

# vs f16-rounded operands only float32 accumulation differs (~sqrt(K) 2^-24); see moetile.audit
BOUND_F16 = 1e-4
# vs exact operands: f16 rounding of both operands, 2^-11 each, adds in quadrature over K
BOUND_EXACT = 4e-3
# K spans two super-blocks (K-stepping, scale prefetch) and N is not a multiple of the row block;
# test_long_k covers K = 1280 (five super-blocks, an odd count)
E, N, K = 6, 80, 512


# every packed form: (qtype, pack form)
FORMS = [("Q4_K", "auto"), ("Q2_K", "auto"), ("IQ2_XXS", "fast"), ("IQ2_XXS", "compact"), ("Q8_0", "auto")]


@dataclass(frozen=True)
class Case:
    qtype: str
    form: str
    rhs: str  # "f32" per token, "f16" per pair
    width: int
    rows: int  # pairs on the hot expert


def _cases() -> list[Case]:
    out = []
    for q, f in FORMS:
        for rhs in ("f32", "f16"):
            for w in schedule.WIDTHS:
                for r in sorted({1, w - 1, w, w + 1, 2 * w + 1}):
                    out.append(Case(q, f, rhs, w, r))
    return out


_W: dict = {}


def _weights(qtype, device, form="auto"):
    """Packed random weights (E, N, K) of ``qtype`` in ``form``, made once per session."""
    key = (qtype, device, form)
    if key not in _W:
        qt = random_blocks(qtype, (E, N, K), generator=torch.Generator().manual_seed(7)).to(device)
        _W[key] = pack(qt, form)
    return _W[key]


def _rhs(kind, T, k, device, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "f32":
        return torch.randn(T, K, generator=g).to(device)
    return torch.randn(T, k, K, generator=g).to(torch.float16).to(device)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c.qtype}-{c.form}-{c.rhs}-w{c.width}-r{c.rows}")
def test_tile_boundaries_skewed(case, device):
    """R pairs on expert 2 (slot 0 of every token); slot 1 spreads over the others."""
    w = _weights(case.qtype, device, case.form)
    T, k = case.rows, 2
    g = torch.Generator().manual_seed(case.rows)
    ids = torch.empty(T, k, dtype=torch.int32)
    ids[:, 0] = 2
    other = torch.randint(0, E - 1, (T,), generator=g, dtype=torch.int32)
    ids[:, 1] = torch.where(other >= 2, other + 1, other)  # never 2
    ids = ids.to(device)
    x = _rhs(case.rhs, T, k, device, case.rows + 1)
    out = torch.full((T, k, N), float("nan"), device=device)
    mul_mm_id(x, w, ids, tile=case.width, out=out)
    assert_rows_close(out.cpu(), mul_mm_id_ref(x, w, ids, round_f16=True).cpu(), BOUND_F16, str(case))
    err = row_rel_err(out.cpu(), mul_mm_id_ref(x, w, ids).cpu())
    assert err.max() < BOUND_EXACT, f"{case}: {err.max():.2e} vs exact operands"


@pytest.mark.parametrize("qtype, form", FORMS)
@pytest.mark.parametrize("rhs", ["f32", "f16"])
def test_long_k(qtype, form, rhs, device):
    """K = 1280: five super-blocks, so every K step, the prefetch of the last step's scales and an
    odd step count are exercised at the widths of both launch-shape families."""
    Kl = 1280
    w = pack(random_blocks(qtype, (E, N, Kl), generator=torch.Generator().manual_seed(3)).to(device), form)
    T, k = 20, 2
    g = torch.Generator().manual_seed(4)
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32).to(device)
    x = (torch.randn(T, Kl, generator=g) if rhs == "f32" else torch.randn(T, k, Kl, generator=g).half()).to(device)
    ref = mul_mm_id_ref(x, w, ids, round_f16=True).cpu()
    for width in (16, 256):
        out = torch.full((T, k, N), float("nan"), device=device)
        mul_mm_id(x, w, ids, tile=width, out=out)
        assert_rows_close(out.cpu(), ref, BOUND_F16, f"{qtype}/{form} K={Kl} w={width}")


@pytest.mark.parametrize("qtype, form", FORMS)
@pytest.mark.parametrize("T", [1, 7, 33, 128, 200])
def test_random_routing_all_widths_agree(qtype, form, T, device):
    w = _weights(qtype, device, form)
    k = 3
    g = torch.Generator().manual_seed(T)
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32).to(device)
    x = _rhs("f32", T, k, device, T)
    ref = mul_mm_id_ref(x, w, ids, round_f16=True).cpu()
    outs = []
    for width in schedule.WIDTHS:
        out = torch.full((T, k, N), float("nan"), device=device)
        mul_mm_id(x, w, ids, tile=width, out=out)
        assert_rows_close(out.cpu(), ref, BOUND_F16, f"{qtype} T={T} w={width}")
        outs.append(out.cpu())
    for o in outs[1:]:
        assert row_rel_err(o, outs[0]).max() < 1e-5


def test_all_pairs_on_one_expert_others_empty(device):
    w = _weights("Q4_K", device)
    T = 70
    ids = torch.full((T, 1), E - 1, dtype=torch.int32, device=device)
    x = _rhs("f32", T, 1, device, 3)
    for tile in ("auto", "ds4", 16, 64):
        out = mul_mm_id(x, w, ids, tile=tile)
        assert_rows_close(out.cpu(), mul_mm_id_ref(x, w, ids, round_f16=True).cpu(), BOUND_F16, str(tile))


def test_zero_tokens(device):
    w = _weights("Q8_0", device)
    out = mul_mm_id(torch.randn(0, K, device=device), w, torch.zeros(0, 6, dtype=torch.int32, device=device))
    assert out.shape == (0, 6, N)


def test_bf16_and_f16_per_token_rhs(device):
    w = _weights("Q2_K", device)
    ids = torch.tensor([[0, 1], [1, 5], [3, 0]], dtype=torch.int32, device=device)
    for dt in (torch.bfloat16, torch.float16):
        x = torch.randn(3, K, device=device).to(dt)
        out = mul_mm_id(x, w, ids, tile=16)
        assert_rows_close(out.cpu(), mul_mm_id_ref(x, w, ids, round_f16=True).cpu(), BOUND_F16, str(dt))


def test_invalid_ids_raise_or_nan(device):
    w = _weights("IQ2_XXS", device)
    ids = torch.tensor([[0, 1], [E, 2], [-1, 3]], dtype=torch.int32, device=device)
    x = torch.randn(3, K, device=device)
    with pytest.raises(ValueError, match=r"outside \[0, 6\).*token 1, slot 0"):
        mul_mm_id(x, w, ids)
    out = mul_mm_id(x, w, ids, validate=False, tile=16).cpu()
    assert torch.isnan(out[1, 0]).all() and torch.isnan(out[2, 0]).all()
    good = torch.tensor([[0, 1], [0, 2], [0, 3]], dtype=torch.int32, device=device)
    ref = mul_mm_id_ref(x, w, good, round_f16=True).cpu()
    assert_rows_close(out[0], ref[0], BOUND_F16)
    assert_rows_close(out[1:, 1], ref[1:, 1], BOUND_F16)


def test_prebuilt_map_reused_across_calls(device):
    w = _weights("Q4_K", device)
    T, k = 40, 2
    ids = torch.rand(T, E).topk(k, dim=1).indices.to(torch.int32).to(device)
    emap = schedule.build_expert_map(ids, E)
    tiles = schedule.build_tiles(emap, 32)
    for kind in ("f32", "f16"):
        x = _rhs(kind, T, k, device, 11)
        out = torch.full((T * k, N), float("nan"), device=device)
        mul_mm_id_mapped(x, w, emap, tiles, out=out)
        assert_rows_close(out.view(T, k, N).cpu(), mul_mm_id_ref(x, w, ids, round_f16=True).cpu(), BOUND_F16)


def test_mapped_launch_checks_its_arguments(device):
    """The low-level launch is public too: a short or wrong-dtype out, an rhs of another K, route
    weights of the wrong length or a map of another expert count raise before any kernel runs."""
    w = _weights("Q4_K", device)
    T, k = 6, 2
    ids = torch.zeros(T, k, dtype=torch.int32, device=device)
    emap = schedule.build_expert_map(ids, E)
    tiles = schedule.build_tiles(emap, 16)
    x = torch.randn(T, K, device=device)
    with pytest.raises(ValueError, match="out must be"):
        mul_mm_id_mapped(x, w, emap, tiles, out=torch.empty(T * k - 1, N, device=device))
    with pytest.raises(ValueError, match="out must be"):
        mul_mm_id_mapped(x, w, emap, tiles, out=torch.empty(T * k, N, device=device, dtype=torch.float16))
    out = torch.empty(T * k, N, device=device)
    with pytest.raises(ValueError, match="K = 512"):
        mul_mm_id_mapped(torch.randn(T, K // 2, device=device), w, emap, tiles, out=out)
    mid = torch.empty(T * k, N, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="route_weights"):
        mul_mm_id_mapped(x, w, emap, tiles, out=mid, w_up=w, route_weights=torch.ones(T * k - 1, device=device))
    with pytest.raises(ValueError, match="expert map"):
        mul_mm_id_mapped(x, w, schedule.build_expert_map(ids, E + 1), tiles, out=torch.empty(T * k, N, device=device))


def test_width_mismatch_is_refused(device):
    w = _weights("Q4_K", device)
    ids = torch.zeros(4, 1, dtype=torch.int32, device=device)
    emap = schedule.build_expert_map(ids, E)
    tiles = schedule.build_tiles(emap, 32)
    cfg = schedule.MMConfig(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=2, asm=False)
    with pytest.raises(AssertionError, match="token tile 64 != tile list width 32"):
        mul_mm_id_mapped(torch.randn(4, K, device=device), w, emap, tiles, out=torch.empty(4, N, device=device),
                         config=cfg)


def test_iq2_fast_k_step_of_32_is_refused(device):
    w = pack(random_blocks("IQ2_XXS", (E, N, K), generator=torch.Generator().manual_seed(1)), "fast").to(device)
    ids = torch.zeros(4, 1, dtype=torch.int32, device=device)
    emap = schedule.build_expert_map(ids, E)
    tiles = schedule.build_tiles(emap, 16)
    cfg = schedule.MMConfig(block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=2, asm=False)
    with pytest.raises(ValueError, match="multiple of 64"):
        mul_mm_id_mapped(torch.randn(4, K, device=device), w, emap, tiles, out=torch.empty(4, N, device=device),
                         config=cfg)


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda w, d: (torch.randn(3, K + 256, device=d), w, torch.zeros(3, 2, dtype=torch.int32, device=d)),
         ValueError, r"must be \(3, 512\)"),
        (lambda w, d: (torch.randn(3, K, device=d), w, torch.zeros(3, 2, dtype=torch.float32, device=d)),
         TypeError, "int32/int64"),
        (lambda w, d: (torch.randint(0, 5, (3, K), device=d), w, torch.zeros(3, 2, dtype=torch.int32, device=d)),
         TypeError, "float32/float16/bfloat16"),
        (lambda w, d: (torch.randn(3, K, device=d), w.planes["codes"], torch.zeros(3, 2, dtype=torch.int32, device=d)),
         TypeError, "PackedTensor or QuantTensor"),
        (lambda w, d: (torch.randn(3, 2, K, device=d)[:, :, ::1].transpose(0, 1).contiguous().transpose(0, 1), w,
                       torch.zeros(3, 2, dtype=torch.int32, device=d)), ValueError, "contiguous"),
        (lambda w, d: (torch.randn(3, 4, K, device=d), w, torch.zeros(3, 2, dtype=torch.int32, device=d)),
         ValueError, r"must be \(3, 2, 512\)"),
        (lambda w, d: (torch.randn(3, K, device=d), w, torch.zeros(3, dtype=torch.int32, device=d)),
         ValueError, r"\[T, k\]"),
    ],
)
def test_bad_inputs(make, err, match, device):
    w = _weights("Q4_K", device)
    with pytest.raises(err, match=match):
        mul_mm_id(*make(w, device))


def test_bad_out_and_k_multiple(device):
    w = _weights("Q4_K", device)
    ids = torch.zeros(3, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="out must be"):
        mul_mm_id(torch.randn(3, K, device=device), w, ids, out=torch.empty(3, 2, N + 1, device=device))
    w8 = random_blocks("Q8_0", (2, 32, 96))
    with pytest.raises(ValueError, match="multiple of 256"):
        mul_mm_id(torch.randn(3, 96), w8, torch.zeros(3, 1, dtype=torch.int32))


@pytest.mark.gpu
def test_devices_must_match():
    w = _weights("Q4_K", "cuda")
    with pytest.raises(ValueError, match="one device"):
        mul_mm_id(torch.randn(3, K), w, torch.zeros(3, 2, dtype=torch.int32))


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch, helpers):
    """The fallback warns once and computes the op; checked against gguf's numpy dequantization
    (independent of moetile's) times the f16-rounded activations."""
    import moetile.ops._launch as launch
    from moetile.quant import q4_k

    monkeypatch.setattr(launch, "interpreted", lambda: False)
    launch._warn_fallback.cache_clear()
    qt = random_blocks("Q4_K", (E, N, K), generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([[0, 1]], dtype=torch.int32)
    x = torch.randn(1, K)
    with pytest.warns(RuntimeWarning, match="torch reference runs instead"):
        out = mul_mm_id(x, qt, ids)
    deq = torch.from_numpy(helpers.gguf_reference(q4_k, qt.data)).reshape(E, N, K).half().double()
    ref = torch.stack([deq[e] @ x[0].half().double() for e in (0, 1)])[None]
    assert_rows_close(out, ref.float(), 1e-6)


# ----------------------------------------------------------------------------- GPU, DS4 shapes
@pytest.mark.gpu
@pytest.mark.parametrize("qtype, n, k_in", [("IQ2_XXS", 2048, 4096), ("Q2_K", 4096, 2048),
                                            ("Q4_K", 2048, 4096), ("Q4_K", 4096, 2048), ("Q8_0", 2048, 4096)])
def test_ds4_shapes_gpu(qtype, n, k_in):
    g = torch.Generator(device="cuda").manual_seed(0)
    Ex, k = 256, 6
    w = random_blocks(qtype, (Ex, n, k_in), generator=g, device="cuda")
    for T in (1, 32, 512, 2048, 8192):
        ids = torch.rand(T, Ex, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
        per_pair = n == 4096 and k_in == 2048
        x = (torch.randn(T, k, k_in, device="cuda", generator=g).half() if per_pair
             else torch.randn(T, k_in, device="cuda", generator=g))
        out = torch.full((T, k, n), float("nan"), device="cuda")
        mul_mm_id(x, w, ids, out=out)
        assert not torch.isnan(out).any(), f"{qtype} T={T}: unwritten rows"
        s = torch.randperm(T, device="cuda", generator=g)[:48].sort().values  # sampled tokens
        ref = mul_mm_id_ref(x[s].contiguous(), w, ids[s].contiguous(), round_f16=True)
        assert_rows_close(out[s], ref, BOUND_F16, f"{qtype} T={T}")


@pytest.mark.gpu
def test_offsets_past_2_31_gpu():
    """Q8_0 E=256, N=4096, K=4096: expert 255 starts 4.55 GB into the tensor (int64 offsets)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    w = random_blocks("Q8_0", (256, 4096, 4096), generator=g, device="cuda")
    assert 255 * 4096 * w.row_bytes > 2**31
    ids = torch.tensor([[255, 0], [254, 255]], dtype=torch.int32, device="cuda")
    x = torch.randn(2, 4096, device="cuda", generator=g)
    out = mul_mm_id(x, w, ids, tile=16)
    assert_rows_close(out, mul_mm_id_ref(x, w, ids, round_f16=True), BOUND_F16)
