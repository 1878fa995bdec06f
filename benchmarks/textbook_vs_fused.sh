#!/usr/bin/env bash
# The textbook updates (the defaults: separate losses and optimizers, two plain critics) against --fused-update (one
# backward / one Adam, both critics in one batched matmul) at AntMaze sizes, 3 alternating runs each.
# Usage: bash benchmarks/textbook_vs_fused.sh [THREADS]   (about 8 minutes on one core)
# Alternating A/B runs on the same core see the same load, so their ratio holds even on a busy machine.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
: > benchmarks/results/iql_textbook_vs_fused.jsonl
: > benchmarks/results/calql_textbook_vs_fused.jsonl
for rep in 1 2 3; do
  for f in "" --fused-update; do
    python benchmarks/update_throughput.py --algo iql --threads "$threads" $f \
      >> benchmarks/results/iql_textbook_vs_fused.jsonl
    python benchmarks/update_throughput.py --algo calql --threads "$threads" --updates 40 --warmup 5 $f \
      >> benchmarks/results/calql_textbook_vs_fused.jsonl
  done
done
