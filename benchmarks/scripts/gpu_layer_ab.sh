#!/usr/bin/env bash
# One GPU session: wide-tile sweep, decode crossover, gate/up A/B, then the layer benchmark of this
# tree and of the tree before the packed forms (.baseline/src = commit ebe10f9) in the same run.
# Usage: bash benchmarks/scripts/gpu_layer_ab.sh OUTDIR new|old   (PYTHONPATH must hold gguf)
set -uo pipefail
out=${1:?outdir}
part=${2:?new or old}
site=${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
run_new() { PYTHONPATH=$site:$PWD/src "$@"; }
run_old() { PYTHONPATH=$site:$PWD/.baseline/src "$@"; }
if [ "$part" = new ]; then
run_new timeout 150 python3 benchmarks/scripts/packed_sweep.py benchmarks/scripts/wide_candidates.json "$out/wide.csv" 2>&1 | tail -12
run_new timeout 120 python3 benchmarks/scripts/decode_crossover_packed.py 2>&1 | tee "$out/decode_crossover.log"
run_new timeout 120 python3 benchmarks/scripts/gate_up_ab.py 2>&1 | tee "$out/gate_up.log"
for m in "q2 fast" "q2 compact" "q4 auto"; do
  set -- $m
  run_new timeout 150 python3 -m moetile.cli.main bench --model "$1" --form "$2" --tokens-start 128 --tokens-max 8192 \
    --step-mul 4 --gen-tokens 1 --widths 16,32,64,128,auto --reps 10 --csv "$out/layer_new.csv" 2>&1 | tail -32
done
fi
if [ "$part" = old ]; then
for m in q2 q4; do
  run_old timeout 150 python3 -m moetile.cli.main bench --model "$m" --tokens-start 128 --tokens-max 8192 \
    --step-mul 4 --gen-tokens 1 --widths 32,64,128,auto --no-baseline --reps 10 --csv "$out/layer_old.csv" 2>&1 | tail -24
done
fi
if [ "$part" = final ]; then
run_new timeout 150 python3 -m moetile.cli.main bench-ops --tokens 512,2048,8192 --widths 16,64,128,256 --reps 10 \
  --csv "$out/ops_new.csv" 2>&1 | tail -70
run_old timeout 100 python3 -m moetile.cli.main bench-ops --tokens 2048,8192 --widths 64,128 --reps 10 \
  --csv "$out/ops_old.csv" 2>&1 | tail -30
run_new timeout 100 python3 -m moetile.cli.main bench --model q2 --form compact --tokens-start 512 --tokens-max 8192 \
  --step-mul 4 --gen-tokens 1 --widths 16,64,128,256,auto --reps 10 --csv "$out/layer_compact.csv" 2>&1 | tail -28
run_new timeout 60 python3 benchmarks/scripts/gate_up_ab.py 256 2>&1 | tee "$out/gate_up_256.log"
run_new timeout 100 python3 -m moetile.cli.main bench --model q2 --tokens-start 2048 --tokens-max 8192 --step-mul 4 \
  --gen-tokens 0 --routing zipf,worst --widths 64,128,256,auto --no-baseline --reps 10 --csv "$out/routing_new.csv" 2>&1 | tail -22
run_old timeout 100 python3 -m moetile.cli.main bench --model q2 --tokens-start 2048 --tokens-max 8192 --step-mul 4 \
  --gen-tokens 0 --routing zipf,worst --widths 64,128,auto --no-baseline --reps 10 --csv "$out/routing_old.csv" 2>&1 | tail -18
fi
if [ "$part" = check ]; then  # after the last kernel change: tests, main job, routing, compact form
run_new timeout 100 python3 -m moetile.cli.main bench-ops --tokens 128,512,2048,8192 --widths 16,64,128,256 --reps 10 \
  --csv "$out/ops_new.csv" 2>&1 | tail -75
run_new timeout 240 python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$out/tests_full.log" | tail -4
PYTHONPATH=$site timeout 330 make run > "$out/make_run.log" 2>&1; echo "make run rc=$?"
grep -E "audit clean|AUDIT FAILED" "$out/make_run.log"; cp -r out "$out/"
for m in q2 q4; do
  run_new timeout 100 python3 -m moetile.cli.main bench --model $m --tokens-start 2048 --tokens-max 8192 --step-mul 4 \
    --gen-tokens 0 --routing uniform,zipf,worst --widths 64,128,256,auto --no-baseline --reps 10 \
    --csv "$out/routing.csv" 2>&1 | grep -E "uniform|zipf|worst"
done
run_new timeout 100 python3 -m moetile.cli.main bench --model q2 --form compact --tokens-start 128 --tokens-max 8192 \
  --step-mul 4 --gen-tokens 1 --widths 16,64,128,256,auto --reps 10 --csv "$out/layer_compact.csv" 2>&1 | tail -30
fi
if [ "$part" = ab ]; then  # the before/after tables of BENCHMARKS.md: both trees in one run
run_new timeout 90 python3 -m moetile.cli.main bench-ops --tokens 128,512,2048,8192 --widths 16,64,128,256 --reps 10 \
  --csv "$out/ops_new.csv" > "$out/ops_new.log" 2>&1
run_old timeout 120 python3 -m moetile.cli.main bench-ops --tokens 128,512,2048,8192 --widths 16,32,64,128 --reps 10 \
  --csv "$out/ops_old.csv" > "$out/ops_old.log" 2>&1
for m in q2 q4; do
  run_new timeout 100 python3 -m moetile.cli.main bench --model $m --tokens-start 128 --tokens-max 8192 --step-mul 4 \
    --gen-tokens 1 --widths 16,64,256,auto --reps 10 --csv "$out/layer_new.csv" > "$out/layer_new_$m.log" 2>&1
  run_old timeout 150 python3 -m moetile.cli.main bench --model $m --tokens-start 128 --tokens-max 8192 --step-mul 4 \
    --gen-tokens 1 --widths 32,64,128,auto --no-baseline --reps 10 --csv "$out/layer_old.csv" > "$out/layer_old_$m.log" 2>&1
done
echo ab done
fi
