"""Study 1 of docs/results.md: ReVal vs GRPO on the built-in task and model, seeds as arguments.

    python benchmarks/llm_study.py --seeds 1 2 3                 # both settings, about 20 min per seed on 1 core
    python benchmarks/llm_study.py --seeds 4 --settings n1       # only the 1-rollout-per-prompt setting

Settings (every run: same prompts per round, same learning rate, same evaluation; only the algorithm differs):

* ``main``: 16 prompts x 8 rollouts per round (the scripts' defaults). GRPO (DAPO loss, clip-higher, group std) and
  ReVal with K = 1, 2 (the paper's default) and 4 updates per generation round.
* ``n1``: 32 prompts x 1 rollout per round (ReVal Sec. 5.4). GRPO then has singleton groups (verl's rule: the raw
  reward is the advantage, i.e. REINFORCE); ReVal uses K = 8 updates per round, the setting of the paper's Fig. 6.

Each run is a plain call of ``grpo_llm.py`` / ``reval_llm.py`` (the command is stored in the study's manifest) writing
to ``<out>/<setting>/<method>/seed<k>``. Finished runs (summary.json present) are skipped, so an interrupted study is
continued by running the same command again. Extract and plot with ``benchmarks/make_results.py``.
"""

import dataclasses
import os
import sys
import time
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from study_common import llm_run_flags, record_run, run_logged  # noqa: E402

SETTINGS = {
    "main": {"flags": ["--prompts-per-round", "16", "--group-size", "8"],
             "methods": {"grpo": ("grpo_llm.py", []),
                         "reval_k1": ("reval_llm.py", ["--updates-per-round", "1"]),
                         "reval_k2": ("reval_llm.py", ["--updates-per-round", "2"]),
                         "reval_k4": ("reval_llm.py", ["--updates-per-round", "4"])}},
    "n1": {"flags": ["--prompts-per-round", "32", "--group-size", "1"],
           "methods": {"grpo": ("grpo_llm.py", []),
                       "reval_k8": ("reval_llm.py", ["--updates-per-round", "8"])}},
}


@dataclasses.dataclass
class Cli:
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every run"""
    settings: tuple[Literal["main", "n1"], ...] = ("main", "n1")
    """which settings to run (see the module docstring)"""
    rounds: int = 60
    """generation rounds per run"""
    eval_every: int = 10
    """evaluate every this many rounds"""
    eval_prompts: int = 128
    """held-out prompts per evaluation"""
    eval_samples: int = 4
    """k of the sampled mean@k accuracy"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS)"""
    out: str = os.path.join(ROOT, "benchmarks", "runs", "llm")
    """output folder of the study"""
    extra: str = ""
    """more flags for every run, written with '=': --extra='--model path/to/model'"""


def main(a: Cli) -> None:
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")
    common = llm_run_flags(a.rounds, a.eval_every, a.eval_prompts, a.eval_samples, a.extra)
    study_command = " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    for seed in a.seeds:  # seed-major: a study cut short still has every method for the seeds it finished
        for setting in a.settings:
            for method, (script, flags) in SETTINGS[setting]["methods"].items():
                run_dir = os.path.join(a.out, setting, method, f"seed{seed}")
                cmd = [sys.executable, script, "--seed", str(seed), "--output-dir", run_dir, *common,
                       *SETTINGS[setting]["flags"], *flags]
                key = f"{setting}/{method}/seed{seed}"
                if os.path.exists(os.path.join(run_dir, "summary.json")):
                    print(f"{key}: done, skipped")
                    continue
                t0 = time.time()
                run_logged(cmd, run_dir + ".log", env, cwd=ROOT)
                record_run(a.out, key, {"command": " ".join(["python"] + cmd[1:]).replace(ROOT + "/", ""),
                                         "threads": a.threads, "wall_s": round(time.time() - t0, 1)}, study_command)
                print(f"{key}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Cli))
