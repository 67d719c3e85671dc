"""quantize_act (two-level int8 activations of the integer mat-vec) against its float32 torch twin
(reference.act_quant_ref) and against x itself: every element within dx/256 of x, in every layout."""

from __future__ import annotations

import pytest
import torch

from moetile.ops.act_quant import quantize_act
from moetile.reference import act_dequant_ref, act_quant_ref


def _x(R, K, seed=0, dtype=torch.float32):
    """[R, K] with magnitudes over six decades from block to block (each block its own scale)."""
    g = torch.Generator().manual_seed(seed)
    decade = 10.0 ** torch.randint(-3, 3, (R, K // 32, 1), generator=g).float()
    x = torch.randn(R, K // 32, 32, generator=g) * torch.rand(R, K // 32, 32, generator=g).pow(4) * decade
    return x.reshape(R, K).to(dtype)


@pytest.mark.parametrize("layout", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_twin_and_x(layout, dtype, device):
    R, K = 5, 256
    x = _x(R, K, dtype=dtype)
    x[1, 64:96] = 0  # an all-zero block: dx = 0, every word 0
    x[2, :32] = 1e-30  # tiny, not zero
    sign = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1)) * 2 - 1
    x[3, 32:64] = (1 + torch.arange(32) / 16) * 1e-37 * sign  # 127/max|x| would overflow float32
    q = quantize_act(x.to(device), layout)
    assert q.words.shape == (R, K // 32, 16) and q.scales.shape == (R, K // 32) and q.sums.shape == (R, K // 16)
    words, scales, sums = act_quant_ref(x, layout)
    if device == "cpu":  # the interpreter runs the same IEEE float32 steps as torch on the CPU
        assert torch.equal(q.words.cpu(), words) and torch.equal(q.scales.cpu(), scales)
        assert torch.equal(q.sums.cpu(), sums)
    xh = act_dequant_ref(q.words.cpu(), q.scales.cpu(), layout)
    amax = x.float().abs().reshape(R, -1, 32).amax(-1, keepdim=True)
    err = (xh - x.double()).abs().reshape(R, -1, 32)
    # dx/256, and 2% for the GPU's approximate float32 division (2 ulp in 127/amax moves r/dx by ~3e-5*127);
    # where dx/256 is a float32 denormal, its rounding (half of 2^-149) times the largest code, 32639
    bound = amax.double() / 127 / 256 * 1.02 + 32639 * 2.0**-150
    assert (err <= bound).all(), float((err / bound).max())
    assert (err.amax(-1) > 0).any()  # a quantizer, not a copy: the bound above is not vacuous
    assert (q.words.cpu()[1, 2] == 0).all() and q.scales.cpu()[1, 2] == 0
    # the sums are those of the words: sum over each 16 inputs of 256*qh + ql
    a = (xh / q.scales.cpu().double().repeat_interleave(32, 1)).nan_to_num(0.0).round().long()
    assert torch.equal(a.reshape(R, -1, 16).sum(-1), q.sums.cpu().long())


def test_nan_and_inf_poison_their_block_only(device):
    x = _x(2, 128)
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    q = quantize_act(x.to(device), 0)
    s = q.scales.cpu()
    assert torch.isnan(s[0, 0]) and not torch.isnan(s[0, 1:]).any()
    assert torch.isinf(s[1, 1]) and torch.isfinite(s[1, [0, 2, 3]]).all()


def test_bad_arguments(device):
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_act(torch.randn(2, 48, device=device), 0)
    with pytest.raises(ValueError, match="layout"):
        quantize_act(torch.randn(2, 64, device=device), 3)
    assert quantize_act(torch.randn(0, 64, device=device), 0).words.shape == (0, 2, 16)


def test_bad_inputs_are_named(device):
    for bad in (torch.tensor(1.0), torch.ones(2, 64, dtype=torch.int32), [[0.0] * 64]):
        with pytest.raises(TypeError, match="float32/float16/bfloat16"):
            quantize_act(bad.to(device) if isinstance(bad, torch.Tensor) else bad, 0)
    with pytest.raises(ValueError, match="positive multiple of 32"):
        quantize_act(torch.ones(2, 0, device=device), 0)
    with pytest.raises(ValueError, match="layout"):
        quantize_act(torch.ones(2, 64, device=device), True)
