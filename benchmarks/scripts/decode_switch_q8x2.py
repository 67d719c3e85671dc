"""Where the q8x2 mat-vec stops beating the tiled prefill path: whole DS4 layer (graph replay) for
q2 fast, q2 compact and q4 at T = 16..128, and the shared expert (Q8_0, E=1) alone at T = 2..32,
decode (q8x2) against prefill, best of two interleaved rounds, ms. Then a host profile of one eager
q2 step at T=1 with each activation mode.
    python3 benchmarks/scripts/decode_switch_q8x2.py
"""
import cProfile
import pstats
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from decode_graph import ds4_layer, graphed  # noqa: E402

from moetile import moe  # noqa: E402
from moetile.benchmark import (  # noqa: E402
    Shape,
    make_weights,
    time_ms,  # noqa: E402
)
from moetile.moe import DS4MoE  # noqa: E402

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)


def best_of_two(fns: dict) -> dict:
    best = {}
    for _ in range(2):
        for name, fn in fns.items():
            gr = graphed(fn, None)
            best[name] = min(best.get(name, 1e9), time_ms(gr.replay, reps=50))
            del gr
    return best


for model, form in (("q2", "fast"), ("q2", "compact"), ("q4", "auto")):
    w = ds4_layer(model)
    if form == "compact":
        wc = make_weights("q2", Shape(), "cuda", form="compact")
        w = replace(w, gate=wc.gate, up=wc.up, down=wc.down)
    layers = {"decode": DS4MoE(w, validate=False, path="decode", decode_act="q8x2"),
              "prefill": DS4MoE(w, validate=False, path="prefill")}
    for T in (16, 24, 32, 48, 64, 96, 128):
        x = torch.randn(T, 4096, device="cuda")
        b = best_of_two({n: (lambda _, la=la, x=x: la(x)) for n, la in layers.items()})
        print(f"layer {model}/{form} T={T:4}: decode {b['decode']:.4f}  prefill {b['prefill']:.4f}", flush=True)
    if model == "q2" and form == "fast":
        ws = w.packed()
        for T in (2, 4, 8, 12, 16, 24, 32):
            x = torch.randn(T, 4096, device="cuda")
            kw = dict(tile="auto", gate_up="auto", deterministic=False, decode_act="q8x2")
            fns = {p: (lambda _, p=p, x=x: moe._shared(x, ws, dict(kw, path=p))) for p in ("decode", "prefill")}
            b = best_of_two(fns)
            print(f"shared T={T:3}: decode {b['decode']:.4f}  prefill {b['prefill']:.4f}", flush=True)
        for act in ("f32", "q8x2"):
            la = DS4MoE(w, validate=False, decode_act=act)
            x = torch.randn(1, 4096, device="cuda")
            for _ in range(5):
                la(x)
            torch.cuda.synchronize()
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                la(x)
            pr.disable()
            torch.cuda.synchronize()
            print(f"host profile, eager q2 T=1, {act}, 200 calls:")
            pstats.Stats(pr).sort_stats("tottime").print_stats(14)
