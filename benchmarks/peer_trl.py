"""A GRPO round of grpo_llm.py against one step of TRL's GRPOTrainer, side by side, both with HF generate.

    python benchmarks/peer_trl.py --pairs 5     # ~15 min, nothing else running -> benchmarks/results/peer_trl.json

TRL is installed only for this benchmark: a virtual environment (--venv, default benchmarks/runs/trl-venv, not
committed) with the project's packages visible (--system-site-packages) plus trl==1.16.0, made on the first run. Both
sides run in it, so they share torch and transformers. The built-in model (a 1M-parameter Qwen2, built once by
utils/llm_task.py) and the built-in task, the same work per step: 16 prompts x 8 completions of up to 48 new tokens
sampled at temperature 1, the task's math-verify reward, one AdamW step over the 128 completions in micro-batches of
32 (lr 5e-5, DAPO token-mean loss, clip 0.2 / 0.28, no KL, one update per generation), fp32, 2 threads. Seconds per
round (ours: time/round_s; TRL: between consecutive optimizer steps), median of steps 6 to --steps; fresh processes,
the two sides alternating.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import tyro
from study_common import short_commit, spread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL = "trl==1.16.0"
PROMPTS, GROUP, NEW_TOKENS, MICRO, LR = 16, 8, 48, 32, 5e-5


def trl_seconds_per_step(steps: int) -> list:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, ROOT)
    from utils.llm_task import builtin_split, ensure_builtin_model, format_prompt, math_rewards

    torch.set_num_threads(2)
    path = ensure_builtin_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [{"prompt": format_prompt(tok, p["question"], "plain"), "gold": p["answer"]}
            for p in builtin_split("train", PROMPTS * steps)]

    def reward(completions, gold, **_):
        return math_rewards(completions, gold)

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    out = tempfile.mkdtemp()
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=PROMPTS * GROUP
                     // MICRO, num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0,
                     top_p=1.0, learning_rate=LR, weight_decay=0.01, max_grad_norm=1.0, beta=0.0, loss_type="dapo",
                     epsilon=0.2, epsilon_high=0.28, num_iterations=1, max_steps=steps, use_cpu=True, bf16=False,
                     report_to="none", save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, seed=1)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return [b - a for a, b in zip(times, times[1:])]


def ours_seconds_per_round(steps: int, python: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tempfile.mkdtemp()
    cmd = [python, "grpo_llm.py", "--total-rounds", str(steps), "--prompts-per-round", str(PROMPTS), "--group-size",
           str(GROUP), "--max-new-tokens", str(NEW_TOKENS), "--micro-batch-size", str(MICRO), "--learning-rate",
           str(LR), "--loss-type", "dapo", "--eval-every", "100000", "--eval-prompts", "8", "--eval-samples", "0",
           "--checkpoint-every", "100000", "--output-dir", out]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    acc = EventAccumulator(out)
    acc.Reload()
    return [e.value for e in acc.Scalars("time/round_s")]


@dataclasses.dataclass
class Cli:
    pairs: int = 5
    """rounds of (ours, TRL), each side a fresh process"""
    steps: int = 20
    """rounds / optimizer steps per measurement; the median is over steps 6 to this"""
    venv: str = os.path.join(ROOT, "benchmarks", "runs", "trl-venv")
    """the benchmark's own environment (made on the first run: the project's packages plus trl)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "peer_trl.json")
    """the results file (committed)"""
    one: str = ""
    """internal: 'trl' or 'ours', measured in this process (inside the venv)"""


def main(a: Cli) -> None:
    if a.one:
        per = trl_seconds_per_step(a.steps) if a.one == "trl" else ours_seconds_per_round(a.steps, sys.executable)
        print(json.dumps(per))
        return
    python = os.path.join(a.venv, "bin", "python")
    if not os.path.exists(python):
        print(f"making {a.venv} (the project's packages + {TRL}) ...", flush=True)
        for cmd in ([sys.executable, "-m", "venv", "--system-site-packages", a.venv],
                    [python, "-m", "pip", "install", "-q", TRL]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:  # e.g. no package index reachable
                sys.exit(f"error: could not make {a.venv} ({' '.join(cmd[1:4])}): "
                         f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
    env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    runs = {"ours": [], "trl": []}
    for _ in range(a.pairs):
        for side in runs:
            p = subprocess.run([python, os.path.abspath(__file__), "--one", side, "--steps", str(a.steps)],
                               capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode != 0:
                sys.exit(f"{side}: failed\n{p.stderr[-3000:]}")
            per = json.loads(p.stdout.strip().splitlines()[-1])
            runs[side].append(round(statistics.median(per[5:]), 3))
            print(f"{side:>5}: {runs[side][-1]:.3f} s per step", flush=True)
    ratios = [t / o for o, t in zip(runs["ours"], runs["trl"])]
    versions = subprocess.run([python, "-c", "import trl, transformers, torch; print(trl.__version__, "
                               "transformers.__version__, torch.__version__)"], capture_output=True, text=True)
    commit = short_commit()
    result = {"commit": commit, "versions (trl transformers torch)": versions.stdout.strip(), "threads": 2,
              "work": {"prompts": PROMPTS, "group": GROUP, "max_new_tokens": NEW_TOKENS, "micro_batch": MICRO},
              "seconds_per_step": runs, "median_s": {k: statistics.median(v) for k, v in runs.items()},
              "trl_over_ours": spread(ratios)}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["trl_over_ours"]))


if __name__ == "__main__":
    main(tyro.cli(Cli))
