#!/usr/bin/env bash
# Expert parallelism on one host of 2 GPUs (device kind nvidia-h100-x2): the stack benchmark at 2 ranks
# (43 layers) and at 1 rank (as many layers as fit beside the activations: 20), prefill T=8192 a rank (q4: 20 and 10 layers),
# decode T=1 and 8; then the EP tests (NCCL at DS4 shapes, gloo, bench-ep's own). Logs and CSVs to $OUT.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}
mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$O/gpus.txt"
nvidia-smi topo -m | tee -a "$O/gpus.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$O/gpus.txt"
run2() { torchrun --nproc-per-node 2 -m moetile.cli.main bench-ep "$@"; }
run1() { CUDA_VISIBLE_DEVICES=0 python -m moetile.cli.main bench-ep "$@"; }
{
  run2 --model q2 --layers 43 --tokens 8192 --csv "$O/ep2.csv"
  run1 --model q2 --layers 20 --tokens 8192 --csv "$O/ep1.csv"
  run2 --model q4 --layers 20 --tokens 8192 --csv "$O/ep2.csv"
  run1 --model q4 --layers 10 --tokens 8192 --csv "$O/ep1.csv"
  for T in 1 8; do
    run2 --model q2 --layers 43 --tokens $T --reps 5 --csv "$O/ep2.csv"
    run1 --model q2 --layers 20 --tokens $T --reps 5 --csv "$O/ep1.csv"
  done
} 2>&1 | tee "$O/bench.log"
python -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/cli/test_bench_ep.py tests/ops/test_elementwise.py \
  2>&1 | tee "$O/tests.log"
