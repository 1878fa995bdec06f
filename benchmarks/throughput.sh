#!/usr/bin/env bash
# Update throughput of the EDIS scripts' base algorithms at AntMaze sizes, 3 repetitions per configuration.
# Usage: bash benchmarks/throughput.sh > benchmarks/results/throughput.jsonl   (about 3 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
for rep in 1 2 3; do
  python benchmarks/update_throughput.py --algo iql --updates 3000 --warmup 300
  python benchmarks/update_throughput.py --algo iql --updates 3000 --warmup 300 --edis-batch
  python benchmarks/update_throughput.py --algo iql --updates 3000 --warmup 300 --bf16
  python benchmarks/update_throughput.py --algo calql --updates 40 --warmup 3
  python benchmarks/update_throughput.py --algo calql --updates 40 --warmup 3 --edis-batch
  python benchmarks/update_throughput.py --algo calql --updates 40 --warmup 3 --bf16
done
