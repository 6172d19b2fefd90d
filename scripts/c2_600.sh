#!/usr/bin/env bash
# Issue 19, item 3: every C2 row at the converged budget. All 16 variants, PEFT's row of each of
# the 9 methods PEFT implements the same way (`quality --rows all`) and head-only / full fine-tune:
# 27 rows x 3 seeds = 81 runs of 600 steps, linear warm-up (30 steps) then cosine, into results/quality_600.json (resumable: a
# finished run is skipped by its id), then `python -m lora_bench report` for the
# docs/benchmarks.md block "C2 at 600 steps: every row".
#
# Settings: each row's bench setting at the C2 sweep's lr for its family (the 150-step table's
# lr), except where docs/benchmarks.md ("Settings that work on C2") recommends another for this
# budget: the AntiPaSTO gain/rotation variants at 5e-3, lora_xs at 4e-3, antipasto_ablate with
# k = 8 at 2e-3. PEFT's rows take the same lr as ours.
#
#   scripts/c2_600.sh                          # CPU, 2 worker processes of one thread
#   scripts/c2_600.sh --device cuda --jobs 16  # one GPU
#   scripts/c2_600.sh --rows lora,peft:lora --steps 20 --warmup-steps 2 --seeds 0 --out /tmp/q600
#                                              # smoke run: later options override the ones above
#
# Time: a 600-step run trains in 150-300 s on one CPU thread (the full fine-tune longer), so the
# 81 runs take about 5-6 CPU-hours, about 3 h at --jobs 2 on 2 cores; on one H200 a run took
# 50-130 s with many at once (scripts/gpu_quality.sh), about 10-15 min for all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
ARGS=(--name quality_600 --rows all --steps 600 --schedule warmup_cosine --warmup-steps 30 --eval-every 100
      --lr antipasto=5e-3 --lr antipasto_asvd=5e-3 --lr antipasto_corda=5e-3 --lr antipasto_rot=5e-3
      --lr lora_xs=4e-3 --lr antipasto_ablate=2e-3 --set k=8 --jobs 2)
exec "$PY" -m lora_bench quality "${ARGS[@]}" "$@"
