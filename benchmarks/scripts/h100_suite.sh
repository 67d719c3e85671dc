#!/usr/bin/env bash
# The whole GPU test suite at this tree in one device call (kind nvidia-h100-x1), logs to $OUT. The
# tests that need tens of GB (DS4-shape packs, the transformers comparison) run alone after the rest,
# which run in WORKERS pytest-xdist processes sharing the GPU (three processes at once ran those
# big ones out of memory, BENCHMARKS.md §15.4). Each step is cut at BUDGET seconds from the start
# (default 560) so that what ran comes back; then, if time is left, the stage profile (q2/q4, T = 2048
# and 8192) and the layer against transformers.
#   bash benchmarks/scripts/h100_suite.sh
set -u
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}
BUDGET=${BUDGET:-560}
WORKERS=${WORKERS:-8}
mkdir -p "$O"
t() {  # t LOG CMD...: run CMD with what is left of the budget, output to $O/LOG
  local log=$1 left=$((BUDGET - SECONDS))
  shift
  if [ "$left" -lt 15 ]; then echo "skipped (no time left): $*" | tee -a "$O/$log"; return; fi
  timeout "$left" "$@" >>"$O/$log" 2>&1
  echo "rc=$? at ${SECONDS}s: $*" | tee -a "$O/$log"
}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$O/versions.txt"
echo "commit ${MOETILE_COMMIT:-?}" | tee -a "$O/versions.txt"
P="python3 -m pytest -v -p no:cacheprovider"
BIG="test_ds4_shapes_gpu or test_bench_vs_transformers or test_ds4_layer_gpu"
if python3 -c "import xdist" 2>/dev/null; then
  t t_par.log $P -n "$WORKERS" tests -k "not ($BIG)"
else  # two processes
  A="tests/ops tests/kernels tests/test_moe.py"
  t t_par.log $P $A -k "not ($BIG)" &
  t t_par2.log $P tests $(for d in $A; do echo --ignore=$d; done) -k "not ($BIG)" &
  wait
fi
t t_big.log $P tests -k "$BIG"
grep -h -E "^(FAILED|ERROR)|passed|failed|rc=" "$O"/t_*.log
for m in q2 q4; do for T in 2048 8192; do
  t profile.log python3 -m moetile.cli.main profile --model $m --tokens $T --csv "$O/profile.csv"
done; done
t bench_vs.log python3 -m moetile.cli.main bench --vs transformers --reps 50
