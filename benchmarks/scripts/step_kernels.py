"""Each kernel of one DS4 layer step replayed from a CUDA graph: name, GPU time, start offset (us),
from torch.profiler. Run: python3 benchmarks/scripts/step_kernels.py [T ...]"""
import sys
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from decode_graph import ds4_layer, graphed  # noqa: E402

from moetile.benchmark import time_ms  # noqa: E402
from moetile.moe import DS4MoE  # noqa: E402

print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
for model in ("q2", "q4"):
    layer = DS4MoE(ds4_layer(model), validate=False)
    for T in [int(a) for a in sys.argv[1:]] or [1, 8]:
        x = torch.randn(T, 4096, device="cuda")
        gr = graphed(layer, x)
        ms = time_ms(gr.replay, reps=50)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                gr.replay()
            torch.cuda.synchronize()
        ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
        n = len(ev) // 5
        last = ev[-n:]
        t0 = last[0].time_range.start
        print(f"{model} T={T}: graph replay {ms * 1e3:.1f} us, {n} kernels; span of the last replay "
              f"{(last[-1].time_range.end - t0):.1f} us")
        for e in last:
            print(f"   {e.time_range.start - t0:7.1f} +{e.time_range.elapsed_us():6.1f}  {e.name[:90]}")
        del gr
