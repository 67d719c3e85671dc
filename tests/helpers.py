"""Shared test helpers: relative-error metrics that name the first bad coordinates; GGUF block
helpers (the gguf numpy oracle, bit-exact comparison, blocks with extreme f16 fields, the error
metrics of the quality targets)."""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from moetile.audit import row_rel_err  # noqa: F401  (re-exported for the tests)
from moetile.reference_routing import ds4_scores_ref, route_weights_ref, router_logits_ref, select_topk_ref


def assert_rows_close(out: torch.Tensor, ref: torch.Tensor, bound: float, what: str = "") -> None:
    """Every row within ``bound`` relative error; no NaN anywhere. Prints the first bad row."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    nan = torch.isnan(out)
    if nan.any():
        idx = nan.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(nan.sum())} NaN elements (first at {idx}): unwritten output")
    err = row_rel_err(out, ref)
    bad = (err > bound).nonzero().flatten()
    if bad.numel():
        r = bad[0].item()
        o = out.reshape(-1, out.shape[-1])[r, :4].tolist()
        f = ref.reshape(-1, ref.shape[-1])[r, :4].tolist()
        raise AssertionError(
            f"{what}: {bad.numel()} rows over relative error {bound:g}; first row {r}: "
            f"err {err[r].item():.3e}, out[:4] {o}, ref[:4] {f}; max err {err.max().item():.3e}"
        )


# f16 values that stress the dequantizers: subnormals, the largest finite, negatives, ±0
EXTREME_F16 = np.array(
    [2.0**-24, 3 * 2.0**-24, 2.0**-15, 6.1e-5, 65504.0, -65504.0, 30000.0, -1.5, -(2.0**-24), 0.0, -0.0, 1.0],
    dtype=np.float16,
)


class Helpers:
    @staticmethod
    def gguf_reference(mod, data: torch.Tensor) -> np.ndarray:
        """float32 [..., K] from gguf's numpy dequantizer, the oracle."""
        with np.errstate(all="ignore"):
            return gguf_dequantize(data.cpu().numpy(), GGMLQuantizationType[mod.QTYPE])

    @staticmethod
    def assert_bitexact(ref: np.ndarray, out: torch.Tensor) -> None:
        """Same bits everywhere (NaNs only need to be NaN in the same places)."""
        got = out.cpu().numpy()
        assert got.dtype == np.float32 and got.shape == ref.shape, (got.dtype, got.shape, ref.shape)
        nan_ref, nan_got = np.isnan(ref), np.isnan(got)
        where = np.argwhere(nan_ref != nan_got)[:5]
        assert np.array_equal(nan_ref, nan_got), f"NaN positions differ at {where}"
        bits_ref = ref.view(np.uint32)[~nan_ref]
        bits_got = got.view(np.uint32)[~nan_got]
        bad = np.flatnonzero(bits_ref != bits_got)
        assert bad.size == 0, (
            f"{bad.size} values differ; first at flat index {bad[0]}: "
            f"ref {ref[~nan_ref][bad[0]]!r} got {got[~nan_got][bad[0]]!r}"
        )

    @staticmethod
    def random_bytes(n_blocks: int, block_bytes: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n_blocks, block_bytes), dtype=torch.uint8, generator=g)

    @staticmethod
    def set_f16(data: torch.Tensor, offset: int, values: np.ndarray) -> None:
        """Overwrite the f16 field at byte ``offset`` of each block row with ``values``."""
        raw = torch.from_numpy(np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(-1, 2))
        data[:, offset : offset + 2] = raw

    @staticmethod
    def extreme_f16(n: int, seed: int) -> np.ndarray:
        """n f16 values: the extremes list cycled, mixed with random finite normals."""
        rng = np.random.default_rng(seed)
        vals = rng.normal(0, 0.01, n).astype(np.float16)
        pick = rng.random(n) < 0.6
        vals[pick] = rng.choice(EXTREME_F16, pick.sum())
        return vals

    @staticmethod
    def cos_metric(mod) -> float:
        """llama.cpp test-quantize-fns: x[i] = 0.1 + 2 cos(i), error sqrt(Σ(x − x̂)²) / n, n = 4096."""
        n = 4096
        x = (0.1 + 2 * np.cos(np.arange(n, dtype=np.float64))).astype(np.float32)
        x = torch.from_numpy(x).reshape(1, n)
        y = mod.dequantize(mod.quantize(x))
        return float(((x.double() - y.double()) ** 2).sum().sqrt()) / n

    @staticmethod
    def rel_rmse(mod, rows: int = 64, seed: int = 0) -> float:
        """‖x − x̂‖ / ‖x‖ on N(0, 1) rows of 4096."""
        x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(seed))
        y = mod.dequantize(mod.quantize(x))
        return float((x.double() - y.double()).norm() / x.double().norm())


def quantize_in_range(mod, x: torch.Tensor, block: int) -> torch.Tensor | None:
    """``mod.quantize(x)``, or None where it refused x because a block of ``block`` values is too
    small for the format's f16 scale; the refusal must then be justified (max |x| of some block
    below 2^-14, the smallest normal f16) and say so. Any other error propagates."""
    try:
        return mod.quantize(x)
    except ValueError as exc:
        assert "outside what" in str(exc), exc
        assert bool((x.reshape(-1, block).abs().amax(1) < 2.0**-14).any()), f"refused in-range x: {exc}"
        return None


# ----------------------------------------------------------------------------- routing
NEAR_TIE = 1e-5  # f32 vs f64 score error is ~1e-6 at H <= 256; closer scores may swap
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_case(T: int, E: int, H: int, seed: int, x_dtype=torch.float32, device="cpu"):
    """x [T, H], f16 router [E, H] with logits of std ~2, f32 bias [E] of std 0.1."""
    g = gen(seed)
    x = torch.randn(T, H, generator=g).to(x_dtype)
    w = (torch.randn(E, H, generator=g) * (2.0 / math.sqrt(H))).to(torch.float16)
    bias = torch.randn(E, generator=g) * 0.1
    return x.to(device), w.to(device), bias.to(device)


def check_topk_against_ref(x, w, bias, k, ids, weights, scale=1.5) -> int:
    """Assert ids/weights match the float64 oracle; returns how many tokens had a near-tie."""
    T, E = x.shape[0], w.shape[0]
    p_ref = ds4_scores_ref(router_logits_ref(x.cpu(), w.cpu()))  # [T, E] f64
    s_ref = p_ref + (bias.cpu().double() if bias is not None else 0.0)
    ids, weights = ids.cpu(), weights.cpu()
    assert ids.dtype == torch.int32 and ids.shape == (T, k)
    assert weights.dtype == torch.float32 and weights.shape == (T, k)
    top = torch.sort(s_ref, dim=1, descending=True).values[:, : min(k + 1, E)]  # [T, k+1]
    near = ((top[:, :-1] - top[:, 1:]) < NEAR_TIE).any(dim=1)  # any swap-prone pair in the top k+1
    ids_ref = select_topk_ref(p_ref, bias.cpu() if bias is not None else None, k)
    clear = ~near
    mism = (ids[clear] != ids_ref[clear]).any(dim=1)
    assert not mism.any(), (
        f"{int(mism.sum())} tokens select differently; first: got {ids[clear][mism][0].tolist()} "
        f"ref {ids_ref[clear][mism][0].tolist()}"
    )
    for t in near.nonzero().flatten().tolist():  # still a valid top-k within the tolerance
        chosen = s_ref[t, ids[t].long()]
        assert len(set(ids[t].tolist())) == k
        assert (chosen >= top[t, k - 1] - NEAR_TIE).all()
        assert (chosen[:-1] >= chosen[1:] - NEAR_TIE).all()
    # weights for the ids we chose, computed by the oracle from the unbiased p
    w_ref = route_weights_ref(p_ref, ids, scale)
    torch.testing.assert_close(weights.double(), w_ref, rtol=2e-5, atol=1e-7)
    return int(near.sum())


# ----------------------------------------------------------------------------- interpreter
def row_invariant_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """Triton interpreter's tl.dot with every row computed the same way wherever it sits in the
    tile (numpy's einsum loop, not BLAS): see conftest's ``row_invariant_dot``."""
    from triton.runtime.interpreter import TensorHandle

    if a.data.dtype not in (np.float16, np.float32) or b.data.dtype not in (np.float16, np.float32):
        raise NotImplementedError(f"row_invariant_dot: operands {a.data.dtype} x {b.data.dtype}")
    prod = np.einsum("...mk,...kn->...mn", a.data, b.data, optimize=False, dtype=d.data.dtype)
    return TensorHandle(prod + d.data, d.dtype.scalar)


def use_row_invariant_dot() -> None:
    """The same for a whole process (spawned test workers, which no fixture reaches); CPU only."""
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpreterBuilder

        InterpreterBuilder.create_dot = row_invariant_create_dot

