"""Build tests/data/golden_q2.gguf: one small q2 DS4 MoE layer plus its input and the float64
reference output, the fixed point that tests/test_golden.py checks every kernel path against.

Run from the repository root: ``PYTHONPATH=src .venv/bin/python tests/data/make_golden.py``.
Deterministic: the same seed gives the same bytes (weights come from random_blocks, not the
quantizer, so quantizer changes cannot move the file).

Contents (layer 0, ds4 names): gate/up IQ2_XXS (E, F, H), down Q2_K (E, H, F), router f16 [E, H],
bias f32 [E], shared expert Q8_0 (Fs, H)/(Fs, H)/(H, Fs); ``golden.x`` f32 [T, H] ~ N(0, 3²) and
``golden.expected`` f32 [T, H] = ds4_moe_ref(x, layer, round_f16=True) (float64, stored as f32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moetile.gguf_io import MoEConfig, MoELayerTensors, write_gguf
from moetile.moe import MoEWeights
from moetile.quant import random_blocks
from moetile.reference import ds4_moe_ref
from moetile.reference_routing import ds4_scores_ref, router_logits_ref

SEED = 20250611
E, K_TOP, H, F, FS, T = 4, 2, 256, 256, 256, 40
SCALE = 1.5
X_STD = 3.0
GATE_QTYPE, DOWN_QTYPE, SHARED_QTYPE = "IQ2_XXS", "Q2_K", "Q8_0"
# kernels route in float32: a near-tie between the k-th and (k+1)-th expert could flip the choice
# and fail the golden test for a reason that is not drift, so the data must keep a clear gap
MIN_ROUTE_GAP = 1e-3
MAX_FILE_BYTES = 520_000
OUT = Path(__file__).with_name("golden_q2.gguf")


def build_layer(g: torch.Generator) -> MoEWeights:
    """The fixed q2 layer (CPU), drawn from ``g`` in a fixed order."""
    gate = random_blocks(GATE_QTYPE, (E, F, H), g)
    up = random_blocks(GATE_QTYPE, (E, F, H), g)
    down = random_blocks(DOWN_QTYPE, (E, H, F), g)
    router = (torch.randn(E, H, generator=g) * 0.1).half()  # [E, H]
    bias = torch.rand(E, generator=g) * 0.05  # [E] f32
    sg = random_blocks(SHARED_QTYPE, (FS, H), g)
    su = random_blocks(SHARED_QTYPE, (FS, H), g)
    sd = random_blocks(SHARED_QTYPE, (H, FS), g)
    return MoEWeights(gate, up, down, router=router, bias=bias, shared_gate=sg, shared_up=su, shared_down=sd,
                      top_k=K_TOP, scale=SCALE)


def route_gap(x: torch.Tensor, w: MoEWeights) -> float:
    """Smallest (biased) score gap between each token's k-th and (k+1)-th expert."""
    s = ds4_scores_ref(router_logits_ref(x, w.router)) + w.bias.double()  # [T, E]
    top = s.sort(dim=1, descending=True).values
    return float((top[:, K_TOP - 1] - top[:, K_TOP]).min())


def build(seed: int = SEED) -> tuple[MoEWeights, torch.Tensor, torch.Tensor]:
    """(weights, x f32 [T, H], expected f32 [T, H])."""
    g = torch.Generator().manual_seed(seed)
    w = build_layer(g)
    x = torch.randn(T, H, generator=g) * X_STD  # [T, H] f32
    gap = route_gap(x, w)
    if gap < MIN_ROUTE_GAP:
        raise ValueError(f"seed {seed}: routing gap {gap:.2e} < {MIN_ROUTE_GAP}; choose another seed")
    expected = ds4_moe_ref(x, w, round_f16=True).to(torch.float32)  # [T, H]
    return w, x, expected


def write(path: Path = OUT, seed: int = SEED) -> None:
    w, x, expected = build(seed)
    lt = MoELayerTensors(w.gate, w.up, w.down, w.router, w.bias, None, w.shared_gate, w.shared_up,
                         w.shared_down)
    config = MoEConfig(
        expert_count=E, expert_used_count=K_TOP, expert_feed_forward_length=F, embedding_length=H,
        block_count=1, expert_shared_count=1, expert_weights_scale=SCALE,
    )
    lt.check_config(config)
    tensors = lt.to_tensors(0)
    tensors["golden.x"] = x.contiguous()
    tensors["golden.expected"] = expected.contiguous()
    md = config.to_metadata()
    md.update({"golden.seed": seed, "golden.tokens": T, "golden.x_std": X_STD, "golden.round_f16": True,
               "golden.reference": "moetile.reference.ds4_moe_ref(x, layer 0, round_f16=True)"})
    write_gguf(path, tensors, md, arch=config.arch)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes > {MAX_FILE_BYTES}; shrink the golden layer")
    print(f"wrote {path} ({size} bytes), routing gap {route_gap(x, w):.3e}, "
          f"rms(expected) {expected.double().pow(2).mean().sqrt():.4f}")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
