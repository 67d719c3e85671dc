r"""The routed matmul kernels of one layer call under Nsight Compute: where their time goes (stall
reasons, occupancy, memory throughput). Routing given, no shared expert; each case is run once to
compile, then once between cudaProfilerStart/Stop, so only that call is profiled.

    ncu --profile-from-start off --clock-control none --kernel-name regex:"mul_m[mv]_id_kernel" \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
        --section MemoryWorkloadAnalysis --section SchedulerStats \
        python3 benchmarks/scripts/ncu_layer.py [model:T ...]       # default q2:8 q2:2048 q4:2048
"""

import sys

import torch

from moetile.benchmark import Shape, make_routing, make_weights, run_layer


def main(cases) -> None:
    sh = Shape()
    for case in cases:
        model, T = case.split(":")
        T = int(T)
        w = make_weights(model, sh, "cuda")
        ids, rw = make_routing("uniform", T, sh, "cuda", seed=T)
        x = torch.randn(T, sh.H, device="cuda")
        run_layer(w, x, ids, rw)
        torch.cuda.synchronize()
        print(f"profiling {model} T={T}", flush=True)
        torch.cuda.profiler.start()
        run_layer(w, x, ids, rw)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del w


if __name__ == "__main__":
    main(sys.argv[1:] or ["q2:8", "q2:2048", "q4:2048"])
