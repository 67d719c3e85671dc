"""Eager DS4 layer (DS4MoE, validate=False), one stream vs the shared expert on a second stream, q2/q4 at
small T, interleaved rounds, same run: does the fork/join cost host time in eager calls?

    python3 benchmarks/scripts/eager_side_stream.py
"""

import torch
from decode_graph import ds4_layer

from moetile import schedule
from moetile.benchmark import time_ms
from moetile.moe import DS4MoE

for model in ("q2", "q4"):
    layer = DS4MoE(ds4_layer(model), validate=False)
    for T in (1, 8, 128):
        x = torch.randn(T, 4096, device="cuda").bfloat16()
        ms = {}
        for side in (False, True, False, True):
            schedule.SHARED_ON_SIDE_STREAM = side
            ms.setdefault(side, []).append(time_ms(lambda: layer(x), reps=50))
        print(f"{model} T={T}: one stream {ms[False]}  side stream {ms[True]}")
print(torch.cuda.get_device_name(), torch.__version__)
