"""Golden drift test: the DS4 MoE layer stored in tests/data/golden_q2.gguf must reproduce the
stored float64 reference output element by element, on every kernel path.

The file (built by tests/data/make_golden.py, IQ2_XXS/Q2_K experts, Q8_0 shared expert) holds
``golden.x`` f32 [T, H] and ``golden.expected`` f32 [T, H] = ds4_moe_ref(x, round_f16=True).
The bound is per element, relative to rms(expected): a row-norm metric would let a few bad
elements (one dropped pair of one token, as in ds4's PR #264 wide-tile bug) hide in the norm.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetile import routing
from moetile.gguf_io import open_gguf
from moetile.moe import DS4MoE
from moetile.reference import ds4_moe_ref
from moetile.reference_routing import route_ref

PATH = Path(__file__).parent / "data" / "golden_q2.gguf"
E, K_TOP, H, F, FS, T = 4, 2, 256, 256, 256, 40
# |out - expected| <= BOUND * rms(expected) for every element. Observed max on CPU (interpreter):
# prefill 1.3e-4 (f16 operands like the reference; f32 accumulation order and one-ulp f16
# roundings of mid differ), decode 9.8e-4 (f32 operands vs the f16-rounded reference).
BOUND = 2.5e-3


def _golden() -> tuple[torch.Tensor, torch.Tensor]:
    """(x f32 [T, H], expected f32 [T, H]) on the CPU, copied out of the map."""
    f = open_gguf(PATH)
    return f.float_tensor("golden.x").clone(), f.float_tensor("golden.expected").clone()


def drift(out: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """float64 [T, H]: |out - expected| / rms(expected); NaN -> inf."""
    o, e = out.detach().cpu().double(), expected.cpu().double()
    d = (o - e).abs() / e.pow(2).mean().sqrt()
    return torch.nan_to_num(d, nan=float("inf"))


def assert_no_drift(out: torch.Tensor, expected: torch.Tensor, what: str, bound: float = BOUND) -> float:
    """Every element within ``bound``; names the worst element otherwise. Returns the max ratio."""
    assert tuple(out.shape) == tuple(expected.shape), f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    d = drift(out, expected)
    worst = float(d.max())
    if not worst <= bound:
        t, h = divmod(int(d.argmax()), d.shape[1])
        n_bad = int((d > bound).sum())
        raise AssertionError(
            f"{what}: {n_bad} of {d.numel()} elements drift over {bound:g}·rms(expected); worst at "
            f"[t={t}, h={h}]: out {float(out[t, h]):.6g}, expected {float(expected[t, h]):.6g}, "
            f"ratio {worst:.3e}"
        )
    return worst


def test_file_config_matches():
    f = open_gguf(PATH)
    cfg = f.moe_config()
    assert (cfg.arch, cfg.expert_count, cfg.expert_used_count) == ("deepseek4", E, K_TOP)
    assert (cfg.embedding_length, cfg.expert_feed_forward_length, cfg.block_count) == (H, F, 1)
    assert f.layers() == [0]
    assert f.tensor_type("blk.0.ffn_gate_exps.weight") == "IQ2_XXS"
    assert f.tensor_type("blk.0.ffn_up_exps.weight") == "IQ2_XXS"
    assert f.tensor_type("blk.0.ffn_down_exps.weight") == "Q2_K"
    assert f.tensor_type("blk.0.ffn_down_shexp.weight") == "Q8_0"
    assert f.tensor_type("blk.0.ffn_gate_inp.weight") == "F16"
    assert f.tensor_shape("golden.x") == f.tensor_shape("golden.expected") == (T, H)
    assert f.get_metadata("golden.round_f16") is True
    m = DS4MoE.from_gguf(PATH, 0, device="cpu")
    assert m.weights.dims == (E, H, F) and m.weights.top_k == K_TOP and m.weights.has_shared
    assert m.weights.shared_gate.shape == (FS, H)
    x, expected = _golden()
    assert torch.isfinite(expected).all() and expected.abs().max() > 0.1  # a real, non-degenerate output


def test_routing_matches_stored_reference(device):
    """A flipped expert choice would fail the drift tests for a reason other than drift."""
    m = DS4MoE.from_gguf(PATH, 0, device=device)
    w = m.weights
    x, _ = _golden()
    ids, _ = routing.route(x.to(device), w.router, bias=w.bias, k=w.top_k, scale=w.scale)
    ids_ref, _ = route_ref(x, w.router.cpu(), bias=w.bias.cpu(), k=w.top_k, scale=w.scale)
    assert torch.equal(ids.cpu(), ids_ref)
    assert len(torch.unique(ids_ref)) == E  # every expert gets work


def test_reference_reproduces_file():
    """The stored expected output is still what the float64 reference computes (catches a
    reference or dequantizer change before it is blamed on the kernels)."""
    m = DS4MoE.from_gguf(PATH, 0, device="cpu")
    x, expected = _golden()
    ref = ds4_moe_ref(x, m.weights, round_f16=True).float()
    assert_no_drift(ref, expected, "ds4_moe_ref", bound=1e-6)


@pytest.mark.parametrize("tile", [16, 32, "auto"])
def test_prefill_no_drift(tile, device):
    m = DS4MoE.from_gguf(PATH, 0, device=device, tile=tile)
    m.path = "prefill"  # from_gguf's first parameter is named path, so the plan override is set here
    x, expected = _golden()
    out = m(x.to(device))
    worst = assert_no_drift(out, expected, f"prefill tile={tile}")
    print(f"prefill tile={tile}: max |out-expected|/rms = {worst:.3e}")


def test_decode_no_drift(device):
    m = DS4MoE.from_gguf(PATH, 0, device=device)
    m.path = "decode"
    x, expected = _golden()
    out = m(x.to(device))
    worst = assert_no_drift(out, expected, "decode")
    print(f"decode: max |out-expected|/rms = {worst:.3e}")


# ------------------------------------------------------------------ the bound is meaningful
def _slot_outputs(w, x, ids, rw) -> list[torch.Tensor]:
    """float64 [T, H] per slot s: the routed contribution of slot s alone (no shared expert)."""
    outs = []
    for s in range(ids.shape[1]):
        keep = torch.zeros_like(rw)
        keep[:, s] = rw[:, s]
        outs.append(ds4_moe_ref(x, w, topk_ids=ids, topk_weights=keep, include_shared=False, round_f16=True))
    return outs


def _half_tile_dropped(ids: torch.Tensor, width: int = 32, body: int = 16) -> torch.Tensor:
    """bool [T, k]: pairs a ds4-#264-style kernel never multiplies: local positions >= ``body`` of
    each ``width``-wide tile of every expert's run (pairs in expert-major, ascending pair order)."""
    T, k = ids.shape
    flat = ids.reshape(-1).to(torch.int64)
    dropped = torch.zeros(T * k, dtype=torch.bool)
    for e in range(E):
        run = (flat == e).nonzero().squeeze(1)  # ascending pair ids: the expert map's order
        dropped[run] = torch.arange(run.numel()) % width >= body
    return dropped.view(T, k)


def test_bound_catches_ds4_style_corruption():
    m = DS4MoE.from_gguf(PATH, 0, device="cpu")
    w = m.weights
    x, expected = _golden()
    ids, rw = route_ref(x, w.router, bias=w.bias, k=w.top_k, scale=w.scale)

    # slot 1 never added (a wrong slot loop, or its rows never written)
    rw1 = rw.clone()
    rw1[:, 1] = 0
    bad = ds4_moe_ref(x, w, topk_ids=ids, topk_weights=rw1, round_f16=True)
    with pytest.raises(AssertionError, match="drift"):
        assert_no_drift(bad, expected, "slot 1 zeroed")

    # PR #264 scaled down: a 32-wide tile whose body covers only its first 16 pairs
    dropped = _half_tile_dropped(ids)
    assert dropped.any()
    bad = ds4_moe_ref(x, w, topk_ids=ids, topk_weights=rw.masked_fill(dropped, 0), round_f16=True)
    with pytest.raises(AssertionError, match="drift"):
        assert_no_drift(bad, expected, "half-tile bug")

    # the smallest such fault: any ONE dropped (token, slot) pair changes its row by that pair's
    # contribution, which must exceed the bound somewhere in the row
    slots = _slot_outputs(w, x, ids, rw)
    rms = expected.double().pow(2).mean().sqrt()
    per_pair = torch.stack([y.abs().amax(dim=1) for y in slots], dim=1) / rms  # [T, k]
    assert per_pair.min() > 10 * BOUND, f"weakest pair moves its row by only {per_pair.min():.2e}·rms"

    # one expert's rows perturbed: expert e's output scaled by (1 + 1e-2), i.e. a 1% scale error
    # in one expert's dequantization
    e = int(ids[0, 0])
    rw_e = torch.where(ids == e, rw * 1.01, rw)
    bad = ds4_moe_ref(x, w, topk_ids=ids, topk_weights=rw_e, round_f16=True)
    with pytest.raises(AssertionError, match="drift"):
        assert_no_drift(bad, expected, f"expert {e} scaled by 1.01")
