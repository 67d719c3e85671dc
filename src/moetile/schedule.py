"""Expert-major maps, tile lists and every scheduling policy of moetile, in one place.

Dimension letters: T tokens, k experts per token, P = T*k (token, slot) pairs with pair id
p = t*k + s, E experts, w the token-tile width (pairs per tile).

Policies (tile width, kernel block shape, prefill vs decode path) are plain functions returning
small frozen dataclasses. Tests and A/B runs override them through arguments (``tile=``) or the
documented environment variable ``MOETILE_TILE_MAX``; kernels never decide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

WIDTHS: tuple[int, ...] = (16, 32, 64, 128, 256)  # token-tile widths the kernels are built for
TILE_MAX_ENV = "MOETILE_TILE_MAX"
# one expert (the shared expert, a dense Q8_0 matmul): the auto width follows T / 4, the best of
# 16-256 x fused/split at T = 8, 128, 512, 2048, 8192 on the H100 (BENCHMARKS.md §9.5)
DENSE_ROWS_PER_TILE = 4
DETERMINISTIC_ENV = "MOETILE_DETERMINISTIC"


# --------------------------------------------------------------------------- expert-major map
@dataclass(frozen=True)
class ExpertMap:
    """Pairs grouped by expert, built on the device without host synchronisation.

    ``sorted_pairs`` int32 [P]: pair ids, expert by expert, ascending within an expert;
    ``offsets`` int32 [E+2]: run of expert e is ``sorted_pairs[offsets[e]:offsets[e+1]]``; the
    extra bin E holds pairs whose id was outside [0, E) (never multiplied; their rows are NaN);
    ``counts`` int32 [E+1].
    """

    num_tokens: int
    top_k: int
    num_experts: int
    sorted_pairs: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k


@dataclass(frozen=True)
class TileList:
    """Tiles of width ``width`` over an ExpertMap: tile i covers rows
    ``row[i] .. row[i]+width-1`` of expert ``expert[i]``'s run (int32 [n_tiles] each).
    ``n_tiles`` is an upper bound (ceil(P/w) + E + 1, less for a class of crowded experts);
    surplus tiles have row >= count and exit."""

    width: int
    expert: torch.Tensor
    row: torch.Tensor

    @property
    def n_tiles(self) -> int:
        return self.expert.numel()


def build_expert_map(topk_ids: torch.Tensor, num_experts: int) -> ExpertMap:
    """ExpertMap of ``topk_ids`` [T, k] (int32/int64). Ids outside [0, E) go to bin E."""
    T, k = topk_ids.shape
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)  # [P]
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, num_experts))
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    offsets = torch.zeros(num_experts + 2, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=offsets[1:])
    # stable: ascending pair id within an expert; 16-bit keys take a quarter of the radix passes of 64
    keys = ids.to(torch.int16) if num_experts < 2**15 - 1 else ids
    sorted_pairs = torch.argsort(keys, stable=True)
    return ExpertMap(
        T, k, num_experts, sorted_pairs.to(torch.int32), offsets.to(torch.int32), counts.to(torch.int32)
    )


def single_expert_map(num_tokens: int, device) -> ExpertMap:
    """The ExpertMap of T pairs all on expert 0 (k = 1, E = 1: the shared expert), in pair order,
    without a sort; a few elementwise launches, no host sync."""
    r = torch.arange(3, dtype=torch.int32, device=device)
    offsets = torch.clamp(r * num_tokens, max=num_tokens)  # [0, T, T]
    counts = torch.clamp(num_tokens - r[:2] * num_tokens, min=0)  # [T, 0]
    pairs = torch.arange(num_tokens, dtype=torch.int32, device=device)
    return ExpertMap(num_tokens, 1, 1, pairs, offsets, counts)


def build_tiles(emap: ExpertMap, width: int, min_rows: int = 0, max_rows: int | None = None) -> TileList:
    """Tile list of ``width`` pairs per tile, sized by an upper bound (no host sync): one Triton
    launch (kernels/tiles.py). Only experts with ``min_rows <= count < max_rows`` get tiles (one
    width class of a two-width plan); the bin of invalid ids belongs to the class from 0 rows."""
    if width not in WIDTHS:
        raise ValueError(f"tile width must be one of {WIDTHS}, got {width}")
    n_bins = emap.counts.numel()
    # at most one partial tile per expert of the class, and at most P // min_rows experts hold
    # min_rows pairs or more: a tight bound keeps the grid of a mostly empty wide class small
    classes = n_bins if min_rows <= 0 else min(n_bins, emap.num_pairs // min_rows)
    n_tiles = -(-emap.num_pairs // width) + classes
    dev = emap.counts.device
    from .ops._launch import use_kernel

    if not use_kernel(dev, "build_tiles"):
        from .reference import tile_list_ref

        expert, row = tile_list_ref(emap.counts, width, n_tiles, min_rows, max_rows)
        return TileList(width, expert.to(torch.int32), row.to(torch.int32))
    expert = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    row = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    if n_tiles:
        from .kernels.tiles import tile_list_kernel

        block_t = 64
        tile_list_kernel[(-(-n_tiles // block_t),)](
            emap.counts, expert, row, n_bins, n_tiles, width, min_rows,
            _INT32_MAX if max_rows is None else max_rows,
            BLOCK_E=max(16, 1 << (n_bins - 1).bit_length()), BLOCK_T=block_t,
        )
    return TileList(width, expert, row)


_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- tile-width policy
def tile_max_from_env() -> int:
    """``MOETILE_TILE_MAX`` (default 256): the widest tile any policy may pick."""
    raw = os.environ.get(TILE_MAX_ENV)
    if raw is None or raw.strip() == "":
        return 256
    try:
        val = int(raw)
    except ValueError:
        val = -1
    if val not in WIDTHS:
        raise ValueError(f"{TILE_MAX_ENV}={raw!r} is not a tile width; use one of {WIDTHS}")
    return val


def deterministic_from_env() -> bool:
    """``MOETILE_DETERMINISTIC``: "1" on, "0" or unset off; anything else is an error."""
    raw = os.environ.get(DETERMINISTIC_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{DETERMINISTIC_ENV}={raw!r}: use 1 (batch-invariant results) or 0")
    return raw == "1"


def resolve_deterministic(flag) -> bool:
    """The layer's deterministic switch: ``flag`` (True/False), or the environment when None."""
    if flag is None:
        return deterministic_from_env()
    if not isinstance(flag, bool):
        raise TypeError(f"deterministic must be True, False or None (environment), got {flag!r}")
    return flag


def choose_tile(tile, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Token-tile width for one grouped matmul.

    ``tile`` is ``"ds4"`` (ds4's rule on the whole batch: 128 if T % 128 == 0, else 64 if
    T % 64 == 0, else 32), ``"auto"`` (the next power of two at or above the mean rows per
    expert T*k/E, clamped to [16, 256]: on the H100 the best width tracked it at T = 128, 512,
    2048 and 8192 for the packed kernels; for one expert, a quarter of that: the shared expert's
    best width at T = 8 to 8192), or an int in WIDTHS (forced; the env cap does not apply). Policies are capped by
    ``MOETILE_TILE_MAX``.
    """
    _check_tile(tile)
    if isinstance(tile, int):
        return tile
    cap = tile_max_from_env()
    if tile == "ds4":
        T = num_tokens
        w = 128 if T % 128 == 0 and T >= 128 else 64 if T % 64 == 0 and T >= 64 else 32
    else:  # "auto"
        mean_rows = num_tokens * top_k / max(num_experts, 1)
        if num_experts == 1:  # a dense matmul (the shared expert): narrower tiles, more programs
            mean_rows /= DENSE_ROWS_PER_TILE
        w = 16
        while w < 256 and w < mean_rows:
            w *= 2
    return min(w, cap)


def _check_tile(tile) -> None:
    if isinstance(tile, bool):
        raise TypeError(f"tile must be 'auto', 'ds4' or an int width, got {tile!r}")
    if isinstance(tile, int):
        if tile not in WIDTHS:
            raise ValueError(f"tile width must be one of {WIDTHS}, got {tile}")
    elif not isinstance(tile, str) or tile not in ("auto", "ds4"):
        raise ValueError(f"tile must be 'auto', 'ds4' or an int width, got {tile!r}")


# --------------------------------------------------------------------------- kernel shapes
@dataclass(frozen=True)
class MMConfig:
    """Launch shape of the grouped matmul: token tile ``block_m`` (= tile width), weight rows
    per program ``block_n``, weights per K step ``block_k``, warps, software-pipelining stages,
    and ``asm``: decode with the PTX decoders (GPU) or their plain-tl twins (interpreter, tests)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    asm: bool


# (block_n, block_k, num_warps, num_stages) per packed form and width: the best of 476 shapes per
# op at DS4 shapes on the H100 (BENCHMARKS.md §8, benchmarks/scripts/packed_sweep.py). Q8_0 (the
# shared expert, one expert) takes the K-quants' shapes but at width 256 (its T > 512) four stages:
# the best of 78 shapes per op (73 launched) for its gate and down at T = 2048 and 8192, 1-7% faster
# (BENCHMARKS.md §16.3).
_K_QUANT = {16: (64, 128, 4, 3), 32: (64, 128, 4, 3), 64: (64, 128, 4, 2), 128: (64, 128, 4, 3),
            256: (128, 64, 8, 3)}
_MM_SHAPES = {
    "IQ2_XXS/fast": {16: (128, 128, 4, 2), 32: (128, 128, 8, 3), 64: (64, 128, 4, 3), 128: (64, 128, 4, 3),
                     256: (128, 64, 8, 3)},
    "IQ2_XXS/compact": {16: (64, 128, 4, 2), 32: (128, 128, 8, 2), 64: (64, 128, 4, 2), 128: (64, 128, 4, 2),
                        256: (128, 64, 8, 3)},
    "Q2_K": {16: (64, 128, 4, 3), 32: (64, 128, 4, 3), 64: (64, 128, 4, 3), 128: (64, 128, 4, 3),
             256: (64, 64, 4, 3)},
    "Q4_K": _K_QUANT,
    "Q8_0": {**_K_QUANT, 256: (128, 64, 8, 4)},
}
# the fused gate+up kernel decodes two weight tiles per step (swept for Q4_K up to width 64, used
# for every form); at 256 two [64, 256] accumulators need 8 warps
_MM_FUSED = {16: (64, 128, 4, 3), 32: (64, 128, 4, 3), 64: (64, 128, 4, 2), 128: (64, 128, 4, 2),
             256: (64, 64, 8, 2)}


def mm_config(width: int, n_rows: int, form: str, fused: bool = False, *, interpreter: bool = False) -> MMConfig:
    """Kernel shape for a tile width, packed form ("Q4_K", "IQ2_XXS/fast", ...) and N.
    The fused gate+up variant holds two accumulators and decodes two tiles per step."""
    block_n, block_k, warps, stages = _MM_FUSED[width] if fused else _MM_SHAPES[form][width]
    while block_n > 64 and n_rows % block_n:
        block_n //= 2
    return MMConfig(width, block_n, block_k, warps, stages, asm=not interpreter)


def form_key(w) -> str:
    """The policy key of a PackedTensor: its type, and its form where the type has several."""
    return w.qtype if w.form == "planar" else f"{w.qtype}/{w.form}"


@dataclass(frozen=True)
class MVConfig:
    """Launch shape of the decode mat-vec: weight rows per program, weights per K step, warps, and
    ``asm``: PTX decoders (GPU) or their plain-tl twins (interpreter, tests)."""

    block_n: int
    block_k: int
    num_warps: int
    asm: bool = True


def mv_config(interpreter: bool, act: str = "f32", fused: bool = True) -> MVConfig:
    """Decode mat-vec shape for activations ``act`` ("f32" or "q8x2", MV_ACTS), fused gate+up or a
    single weight (down): 16 rows per program on the GPU (few pairs, so many small programs fill the SMs;
    BENCHMARKS §8, §12; 32 for a q8x2 down, §13), 256 under Triton's
    interpreter, whose cost is per program, not per row (64 rows took 4x the time of 256). Fewer than
    16 rows with the PTX decoders gave wrong values for the word decoders on the H100 (Triton 3.6:
    benchmarks/h100-2026-11-26/mv_config_check.log), so launch_mv refuses them; a K step is at most
    256 (one block's scale of the K-quants and IQ2_XXS)."""
    if act not in MV_ACTS:
        raise ValueError(f"mat-vec activations must be one of {MV_ACTS}, got {act!r}")
    if interpreter:
        return MVConfig(256, 256, 2, asm=False)
    if act == "q8x2":
        return MVConfig(*(_MV_SHAPE_Q if fused else _MV_SHAPE_Q_SINGLE), asm=True)
    return MVConfig(*_MV_SHAPE, asm=True)


# Activations of the decode mat-vec: "q8x2" quantizes them per 32 inputs to two int8 levels (x ~=
# dx/256 * (256*qh + ql), error <= max|x|/32512) and multiplies with integer dp4a products, "f32" keeps
# them exact in float32. q8x2 took a DS4 step's routed matmuls from 82.5 to 53 us (q2) and 82.6 to
# 56 us (q4) on the H100 for a row error of ~3e-5 (BENCHMARKS.md §12).
MV_ACTS = ("f32", "q8x2")
MV_ACT = "q8x2"
# q8x2: (16, 256, 2) was within 6% of the best of 12 shapes for q2/q4/compact/shared at T = 1 and 8
_MV_SHAPE_Q = (16, 256, 2)
# q8x2 down (one weight, K = F = 2048): 32 rows a program was the best of 8 shapes (x 3 pipeline depths) for
# q2, q4 and q2 compact at T = 1 and 8 (q2 T=1 down 18.5 -> 14.8 us, T=8 115 -> 106 us; H100, BENCHMARKS.md
# §13); the fused gate+up keeps 16 (32 rows: 27 -> 30 us at T=1); the shared expert's down (E = 1, on the
# side stream in a graph) loses 0.3 us with 32
_MV_SHAPE_Q_SINGLE = (32, 256, 2)
_MV_SHAPE = (16, 128, 2)
# the decode mat-vec cuts K into chunks until its grid has at least this many programs (a few
# pairs give too few to keep the SMs busy otherwise): 512 was best of 1 (never), 512, 1024, 2048
# and 4096 for a DS4 step in a CUDA graph on the H100, T = 1 and 2 (BENCHMARKS.md §9)
MV_MIN_PROGRAMS = 512
MV_MAX_SPLIT = 8


def mv_split(n_rows: int, n_pairs: int, k: int, cfg: MVConfig, allowed: bool = True) -> int:
    """How many K chunks the decode mat-vec runs in parallel (1: none, and always when not
    ``allowed``): the fewest (a power of two, at most MV_MAX_SPLIT) that give MV_MIN_PROGRAMS
    programs, every chunk a whole number of K steps."""
    programs = -(-n_rows // cfg.block_n) * n_pairs
    split = 1
    while (allowed and split < MV_MAX_SPLIT and programs * split < MV_MIN_PROGRAMS
           and k % (2 * split * cfg.block_k) == 0):
        split *= 2
    return split


@dataclass(frozen=True)
class RouterConfig:
    """Launch shapes of the router (kernels/router.py). Logits: tokens, experts and inputs per
    program step, warps, pipelining stages, and ``h_chunk`` inputs per chunk (a multiple of
    block_k; chunks run in parallel and are summed in order by the select kernel). Select:
    ``select_t`` tokens per program, ``select_warps`` warps (neither changes a bit of the result:
    the select kernel's sums run in a fixed order per token)."""

    block_t: int
    block_e: int
    block_k: int
    num_warps: int
    num_stages: int
    h_chunk: int
    select_t: int
    select_warps: int


def router_config(hidden: int, interpreter: bool) -> RouterConfig:
    """Depends on H only, never on T: a token's logits must not depend on the batch. Under the
    interpreter, whose cost is per program, wider blocks (and chunks of 128, so that the tests'
    small H still spans several)."""
    if interpreter:
        return RouterConfig(16, 64, 64, 4, 1, 128, 16, 4)
    bt, be, bk, warps, stages, chunk, st, sw = _ROUTER_SHAPE
    return RouterConfig(bt, be, bk, warps, stages, min(chunk, -(-hidden // bk) * bk), st, sw)


# logits: the best all-round of 11 shapes on the H100, GPU time in a CUDA graph from T = 1 to 8192
# (BENCHMARKS.md §9, benchmarks/scripts/router_sweep.py); select: one token per one-warp program was the
# best of 8 (route at T = 1: 0.027 -> 0.021 ms, T = 8192: 0.317 -> 0.307; BENCHMARKS.md §12)
_ROUTER_SHAPE = (64, 64, 32, 4, 3, 512, 1, 1)


# --------------------------------------------------------------------------- layer plan
# T at or below this takes the mat-vec path, by the mat-vec's activations and the gate/up form. H100, whole
# DS4 step in a CUDA graph. q8x2 (BENCHMARKS.md §12): q2 fast decode wins to T=64 (96: prefill), q2
# compact to 96 (128: even), q4 to 32 (48: prefill); the shared expert (Q8_0, E=1) to 8 (12: prefill);
# Q2_K gate/up (no DS4 preset) not measured, follows Q4_K. f32 (§9.6): q2 fast to 12, q4 to 8, q2
# compact kept at 8; Q2_K gate/up and Q8_0 follow q4.
DECODE_MAX_TOKENS = {
    "q8x2": {"IQ2_XXS/fast": 64, "IQ2_XXS/compact": 96, "Q2_K": 32, "Q4_K": 32, "Q8_0": 8},
    "f32": {"IQ2_XXS/fast": 12, "IQ2_XXS/compact": 8, "Q2_K": 8, "Q4_K": 8, "Q8_0": 8},
}


def decode_max_tokens(form: str, act: str = "auto") -> int:
    """The most tokens the "auto" plan runs on the mat-vec path for gate/up form ``form`` (form_key)
    with activations ``act`` ("auto": MV_ACT)."""
    return DECODE_MAX_TOKENS[MV_ACT if act == "auto" else act][form]


PATHS = ("auto", "decode", "prefill")
WIDE = 256  # the wide class of the "auto" plan (BENCHMARKS.md §8: skewed routing)
GATE_UP = ("auto", "fused", "split")
# deterministic mode's one token-tile width, whatever T and the routing are (the auto policy's pick
# for DS4 at T = 2048); a tile's rows do not affect each other, so a fixed width and kernel shape
# make a pair's result independent of the batch
# The shared expert needs only x: in a CUDA graph it runs on a second stream beside the router and the
# routed experts (moe.moe_forward; q2 decode step 0.179 -> 0.146 ms, BENCHMARKS §9.8). Eager calls keep one
# stream: there the fork made the layer slower (0.70 -> 0.78 ms at T=1, 3.95 -> 4.32 at T=128, measured).
# False: one stream in graphs too (A/B).
SHARED_ON_SIDE_STREAM = True

DETERMINISTIC_WIDTH = 64


def _gate_up_default(form: str, width: int) -> str:
    """Fused gate+up for the K-quants and Q8_0 (3-10% faster than split on the H100); split for
    IQ2_XXS (split won at T <= 2048, fused at 8192: within 6% either way) and at width 256 (fused
    was 18-25% slower there: two [64, 256] accumulators)."""
    return "split" if form.startswith("IQ2_XXS") or width == 256 else "fused"


@dataclass(frozen=True)
class LayerPlan:
    """How one MoE layer runs: ``path`` "decode" (mat-vec, f32) or "prefill" (tiled MMA, f16
    operands); ``width`` the token tile (prefill); ``gate_up`` "fused" or "split". A two-width
    plan (``wide`` > 0) gives experts with at least ``wide_rows`` pairs tiles of ``wide`` pairs
    (gate/up variant ``wide_gate_up``) and the rest tiles of ``width`` (skewed routing: a few
    crowded experts, many sparse ones). ``mv_split``: may the decode mat-vec cut K into chunks
    (its chunk count follows the number of pairs, so a deterministic plan says no); ``mv_act``: its
    activations, "q8x2" or "f32" (MV_ACTS)."""

    path: str
    width: int
    gate_up: str
    wide: int = 0
    wide_rows: int = 0
    wide_gate_up: str = "split"
    mv_split: bool = True
    mv_act: str = "f32"

    def tile_lists(self, emap: ExpertMap) -> list[tuple[TileList, str]]:
        """(tile list, gate/up variant) of each width class of this plan over ``emap``."""
        if not self.wide:
            return [(build_tiles(emap, self.width), self.gate_up)]
        return [(build_tiles(emap, self.width, 0, self.wide_rows), self.gate_up),
                (build_tiles(emap, self.wide, self.wide_rows), self.wide_gate_up)]


def check_overrides(tile="auto", path: str = "auto", gate_up: str = "auto", decode_act: str = "auto") -> None:
    """Raise for a plan override no plan accepts (plan_layer's arguments; the layer checks them on
    every call, also where no plan is made: T = 0, the CPU reference)."""
    _check_tile(tile)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if gate_up not in GATE_UP:
        raise ValueError(f"gate_up must be one of {GATE_UP}, got {gate_up!r}")
    if decode_act != "auto" and decode_act not in MV_ACTS:
        raise ValueError(f"decode_act must be 'auto' or one of {MV_ACTS}, got {decode_act!r}")


def plan_layer(num_tokens: int, top_k: int, num_experts: int, form: str, *, tile="auto",
               path: str = "auto", gate_up: str = "auto", deterministic: bool = False,
               decode_act: str = "auto") -> LayerPlan:
    """The one place that decides path, tile width and gate/up variant (each overridable).
    ``form``: the gate/up weights' policy key (``form_key``: "Q4_K", "IQ2_XXS/fast", ...).
    ``deterministic``: choices that do not depend on T or the routing (the prefill path, one
    width, one gate/up variant), so a token's result does not depend on the batch around it.
    ``decode_act``: the mat-vec's activations ("auto": MV_ACT; "f32" exact, "q8x2" two-level int8)."""
    check_overrides(tile, path, gate_up, decode_act)
    if deterministic:
        path = "prefill" if path == "auto" else path
        if tile in ("auto", "ds4"):
            tile = min(DETERMINISTIC_WIDTH, tile_max_from_env())
    act = MV_ACT if decode_act == "auto" else decode_act
    if path == "auto":
        path = "decode" if num_tokens <= DECODE_MAX_TOKENS[act][form] else "prefill"
    width = choose_tile(tile, num_tokens, top_k, num_experts)
    wide, wide_rows = 0, 0
    if tile == "auto" and num_experts > 1 and width < WIDE and tile_max_from_env() >= WIDE:
        # an expert that needs three or more narrow tiles decodes its weights once in a wide one
        wide, wide_rows = WIDE, 2 * width + 1
    wide_gate_up = _gate_up_default(form, WIDE) if gate_up == "auto" else gate_up
    if gate_up == "auto":
        gate_up = _gate_up_default(form, width)
    return LayerPlan(path, width, gate_up, wide, wide_rows, wide_gate_up, mv_split=not deterministic, mv_act=act)
