"""The batch-invariant router logits (ops/router.py) through routing.router_logits(deterministic=True)."""

from __future__ import annotations

import math

import pytest
import torch

from moetile.reference_routing import router_logits_ref
from moetile.routing import router_logits


def make_case(T: int, E: int, H: int, seed: int, x_dtype=torch.float32):
    """x [T, H] and an f16 router [E, H] with logits of std ~2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(x_dtype)
    return x, (torch.randn(E, H, generator=g) * (2.0 / math.sqrt(H))).to(torch.float16)


@pytest.mark.parametrize(
    "x_dtype,w_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32)]
)
def test_deterministic_logits_do_not_depend_on_the_batch(x_dtype, w_dtype, device, row_invariant_dot):
    """router_logits(deterministic=True) (a Triton kernel): a token's row is the same bits in
    batches of 1, 15, 16, 17 and 33 tokens (around the 16-token block), shuffled; E = 72 and H = 96
    leave partial expert and hidden blocks; values match the float64 reference."""
    E, H = 72, 96
    x, w = make_case(33, E, H, seed=11, x_dtype=x_dtype)
    x, w = x.to(device), w.to(w_dtype).to(device)
    full = router_logits(x, w, deterministic=True)
    torch.testing.assert_close(full.double().cpu(), router_logits_ref(x, w).cpu(), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    for T in (1, 15, 16, 17, 33):
        idx = torch.randperm(33, generator=g)[:T].to(device)
        assert torch.equal(router_logits(x[idx], w, deterministic=True), full[idx]), f"T={T}"
    one = torch.zeros(E, H, dtype=w_dtype, device=device)
    one[torch.arange(E), torch.arange(E)] = 1.0  # logit e = x[:, e]: exact in f32, no f16 rounding of x
    torch.testing.assert_close(router_logits(x, one, deterministic=True), x[:, :E].float(), rtol=0, atol=0)


def test_deterministic_logits_without_a_kernel(monkeypatch):
    """The torch fallback (CPU without the interpreter): one product per token, so the same bits."""
    import moetile.ops.router as router_mod

    monkeypatch.setattr(router_mod, "use_kernel", lambda device, op: False)
    x, w = make_case(20, 16, 64, seed=4)
    full = router_logits(x, w, deterministic=True)
    assert all(torch.equal(router_logits(x[t : t + 1], w, deterministic=True)[0], full[t]) for t in (0, 7, 19))
    torch.testing.assert_close(full.double(), router_logits_ref(x, w), rtol=1e-5, atol=1e-5)
