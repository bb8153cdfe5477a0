#!/bin/bash
# The embedder ablation of docs/embedder_ablation.md, end to end (one heavy job: run it under the heavy-job lock):
#   flock /tmp/allmil-heavy.lock bash bench/run_embedder_ablation.sh [VARIANTS...]   (default: in160 in128)
# The cold feature pass takes ~1.5 h on the shared 2-core host; MAX_MINUTES=N stops it after N minutes with its
# progress kept (exit 3), so it can run in slices between other jobs: run the same command again to go on.
# SKIP_COST=1 skips step 1 (already in .cache/protocol4/embedder_cost.json).
# 1. cost of every variant's ONNX embedder, alternated on one core; 2. feature caches of the variants in one pass;
# 3. their 5 protocol-2 fold models + held-out scores (one process per variant, one torch thread each, side by side);
# 4. the table (protocol-2 cell metrics and protocol 4 per variant, rules fitted per fold on the other folds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VARIANTS=("${@:-in160 in128}")
read -r -a VARIANTS <<< "${VARIANTS[*]}"
LOG=.cache/protocol4/ablation_logs
mkdir -p "$LOG"
if [ -z "${SKIP_COST:-}" ]; then
  echo "$(date -u) cost"; $PY bench/bench_embedder.py 2>&1 | grep -v -i warn | tee "$LOG/cost.txt"
fi
echo "$(date -u) features ${VARIANTS[*]}"
$PY -m allmil_cli.train.embedder_ablation features "${VARIANTS[@]}" ${MAX_MINUTES:+--max-minutes "$MAX_MINUTES"} 2>&1 \
  | grep -v -i warn | tee -a "$LOG/features.txt"
pids=()
for v in "${VARIANTS[@]}"; do
  $PY -m allmil_cli.train.heldout --variant "$v" > "$LOG/heldout_$v.txt" 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
echo "$(date -u) summary"; $PY -m allmil_cli.train.embedder_ablation summary 2>&1 | tee "$LOG/summary.txt"
echo "$(date -u) done"
