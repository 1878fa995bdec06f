#!/usr/bin/env bash
# Seconds per GRPO round on the built-in 1M-parameter model: 16 prompts x 8 completions x up to 48 new tokens (the
# setting of the TRL comparison in issue #5), evaluation off. Prints one JSON line per micro-batch size.
# Usage: bash benchmarks/grpo_round_time.sh   (needs the built-in model: run `python grpo_llm.py` once, or it is built)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
for mb in 32 128; do
  out=$(mktemp -d)
  python grpo_llm.py --total-rounds 30 --eval-every 1000 --eval-prompts 8 --eval-samples 0 --micro-batch-size $mb \
      --checkpoint-every 1000 --output-dir "$out" > /dev/null 2>&1
  python - "$out" "$mb" <<'PY'
import json, statistics, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
med = lambda t: round(statistics.median([e.value for e in acc.Scalars(t)][5:]), 3)  # skip 5 warm-up rounds
print(json.dumps({"micro_batch_size": int(sys.argv[2]), "round_s": med("time/round_s"),
                  "generation_s": med("time/generation_s"), "reward_s": med("time/reward_s"),
                  "update_s": med("time/update_s"), "generation_tokens_per_s": med("time/generation_tokens_per_s"),
                  "train_tokens_per_s": med("time/train_tokens_per_s")}))
PY
  rm -rf "$out"
done
