#!/usr/bin/env bash
# Seconds per generation round of GRPO and ReVal (K = 2) on the built-in 1M-parameter model: 16 prompts x 8
# completions x up to 48 new tokens (the setting of the TRL comparison in issue #5), evaluation off, 2 threads.
# Prints one JSON line per script (medians over rounds 6-30); benchmarks/results/llm_round_time.jsonl holds the output.
# Usage: bash benchmarks/llm_round_time.sh > benchmarks/results/llm_round_time.jsonl   (about 3 minutes; needs the
# built-in model: run `python grpo_llm.py` once, or it is built first)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
for script in grpo_llm.py reval_llm.py; do
  out=$(mktemp -d)
  python "$script" --total-rounds 30 --eval-every 1000 --eval-prompts 8 --eval-samples 0 --micro-batch-size 32 \
      --checkpoint-every 1000 --output-dir "$out" > /dev/null 2>&1
  python - "$out" "$script" <<'PY'
import json, platform, statistics, sys, torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
med = lambda t: round(statistics.median([e.value for e in acc.Scalars(t)][5:]), 3)  # skip 5 warm-up rounds
print(json.dumps({"script": sys.argv[2], "round_s": med("time/round_s"), "generation_s": med("time/generation_s"),
                  "reward_s": med("time/reward_s"), "update_s": med("time/update_s"),
                  "generation_tokens_per_s": med("time/generation_tokens_per_s"),
                  "train_tokens_per_s": med("time/train_tokens_per_s"), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "machine": platform.machine()}))
PY
  rm -rf "$out"
done
