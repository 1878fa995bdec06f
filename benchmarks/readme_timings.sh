#!/usr/bin/env bash
# The README's default commands, timed one at a time on an otherwise idle machine, with empty caches as on a fresh
# machine (the PointMaze data is collected by the first run, the built-in LLM by grpo_llm.py).
#   bash benchmarks/readme_timings.sh      -> benchmarks/results/readme_timings.txt (logs in $OUT)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/readme_timings}
rm -rf "$OUT" && mkdir -p "$OUT"
export MINARI_DATASETS_PATH=$OUT/minari REFERENCE_RL_CACHE=$OUT/cache
RESULT=benchmarks/results/readme_timings.txt
echo "# $(date -u +%F) $(git rev-parse --short HEAD), $(nproc) cores, $(python -c 'import torch; print("torch", torch.__version__)')" > "$RESULT"
run() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  "$@" --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name exit=$? wall_s=$(( $(date +%s) - t0 )) :: $*" >> "$RESULT"
  tail -n 1 "$OUT/$name.log" >> "$RESULT"
}
run edis_iql_fresh python edis_iql.py --env pointmaze-umaze
run edis_calql python edis_calql.py --env pointmaze-umaze
run grpo_fresh python grpo_llm.py
run reval python reval_llm.py
grep -a "wrote local/pointmaze\|built-in model ready" "$OUT"/*.log >> "$RESULT"
cat "$RESULT"
