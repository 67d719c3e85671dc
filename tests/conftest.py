"""Test set-up: without CUDA, the Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before moetile is
imported, hence here at the top of the root conftest.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # forced, not defaulted: an inherited TRITON_INTERPRET=0 would make the kernel tests fall back
    # to the torch reference and compare it with itself
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if HAS_CUDA else "cpu"

from helpers import Helpers  # noqa: E402  (imports moetile: after TRITON_INTERPRET is set)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the device machine, not in CI)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def helpers() -> type[Helpers]:
    return Helpers


@pytest.fixture(autouse=True)
def _poison_layer_buffers(monkeypatch):
    """Every buffer moe_forward allocates starts as NaN in the tests (moetile.moe.POISON), so a row
    no kernel wrote cannot pass for a stale correct one."""
    import moetile.moe

    monkeypatch.setattr(moetile.moe, "POISON", True)


def pytest_sessionstart(session):
    if not HAS_CUDA:
        from moetile.ops._launch import interpreted

        assert interpreted(), "no CUDA and the Triton kernels are not interpreted: the kernel tests would test nothing"


@pytest.fixture
def row_invariant_dot(monkeypatch):
    """Batch-invariance tests through the interpreter: its tl.dot is numpy's BLAS matmul, whose
    result for a row depends on the row's place in the tile (OpenBLAS micro-kernels; 1e-6 apart).
    The GPU's MMA has no such dependence, and the GPU tests check the real kernels bit for bit;
    here a product that computes every row the same way (numpy's einsum loop) stands in, so these
    tests check everything else: the plan, the router kernel's blocking, the row bookkeeping."""
    if HAS_CUDA:
        return
    from helpers import row_invariant_create_dot
    from triton.runtime.interpreter import InterpreterBuilder

    monkeypatch.setattr(InterpreterBuilder, "create_dot", row_invariant_create_dot)
