#!/usr/bin/env bash
# One H100 call (device kind nvidia-h100-x1) for issue #9's decode step: the whole GPU suite at this tree
# (first: it verifies the changes made without a GPU), the router's logit kernels (the policy's tile
# against other tiles and a float32 mat-vec prototype for a few tokens), the step's kernel timeline and
# the whole-layer decode table. Logs to $OUT. Two calls of a few minutes each (one call may run 10):
#   bash benchmarks/scripts/h100_decode_next.sh tests;  bash benchmarks/scripts/h100_decode_next.sh bench
set -u
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}
mkdir -p "$O"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$O/versions.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$O/versions.txt"
if [ "${1:-}" = tests ]; then
  python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -40 | tee "$O/gpu_tests.log"
  exit
fi
S=benchmarks/scripts
python3 $S/router_decode_proto.py 2>&1 | tee "$O/router_decode_proto.log"
python3 $S/router_sweep.py 2>&1 | tee "$O/router_sweep.log"
python3 $S/step_kernels.py 1 8 2>&1 | tee "$O/step_kernels.log"
python3 $S/decode_act_ab.py 2>&1 | tee "$O/decode_act_ab.log"
