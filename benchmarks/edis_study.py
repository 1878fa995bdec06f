"""Study 2 of docs/results.md: the paper's EDIS, EDIS with --edis-extras and plain fine-tuning, after the same
offline phase, for IQL and Cal-QL on PointMaze (locally collected data), seeds as arguments.

    python benchmarks/edis_study.py --algos iql --seeds 1 2 3     # about 28 min per IQL seed on one core

Per algorithm and seed the offline phase runs once (``--online-steps 0``); its folder is copied once per arm and each
copy is continued with ``--resume`` for the same online budget: ``paper`` (--edis), ``extras`` (--edis
--edis-extras) and ``noedis`` (--no-edis). The arms start from the same agent and see the same env reset seeds and
batch seeds: they differ only in EDIS. Runs go to ``<out>/<algo>/seed<k>/{offline,paper,extras,noedis}``; finished
ones are skipped and an interrupted one is resumed, so rerunning the command continues a study. The endpoint is
fixed before the runs: the mean normalized score of the last 3 evaluations (``--eval-episodes`` 20 each).
"""

import dataclasses
import os
import shlex
import shutil
import sys
import time
from typing import Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from study_common import record_run, run_logged  # noqa: E402

# offline updates, online env steps, evaluation and EDIS retrain intervals (online steps), per algorithm
BUDGETS = {
    "iql": dict(offline_steps=10_000, online_steps=10_000, eval_every=2_000, retrain_every=2_500),
    "calql": dict(offline_steps=4_000, online_steps=10_000, eval_every=2_000, retrain_every=2_500),
}


ARM_FLAGS = {"noedis": ["--no-edis"], "paper": ["--edis", "--no-edis-extras"], "extras": ["--edis", "--edis-extras"],
             # diagnosis: EDIS's batches without synthetic rows (ratio 0: online only after the first "retrain",
             # whose tiny model is never sampled from), to tell the loss of offline rows from the synthetic data
             "online_only": ["--edis", "--edis-ratio", "0", "--edis-diffusion-steps", "10", "--edis-num-samples", "10",
                             "--edis-sample-steps", "2", "--energy-pool", "16", "--energy-steps", "1"]}


@dataclasses.dataclass
class Cli:
    algos: tuple[Literal["iql", "calql"], ...] = ("iql", "calql")
    """algorithms to run"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every run"""
    env: str = "pointmaze-umaze"
    """task of every run"""
    eval_episodes: int = 20
    """episodes per evaluation"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS)"""
    out: str = os.path.join(ROOT, "benchmarks", "runs", "edis")
    """output folder of the study"""
    offline_steps: Optional[int] = None
    """override BUDGETS[algo]['offline_steps'] for every algorithm"""
    online_steps: Optional[int] = None
    """override BUDGETS[algo]['online_steps'] for every algorithm"""
    eval_every: Optional[int] = None
    """override BUDGETS[algo]['eval_every'] for every algorithm"""
    retrain_every: Optional[int] = None
    """override BUDGETS[algo]['retrain_every'] for every algorithm"""
    arms: tuple[Literal["noedis", "paper", "extras", "online_only"], ...] = ("noedis", "paper", "extras")
    """which online arms to run, in this order"""
    extra: str = ""
    """more flags for the offline phase (the arms inherit its config), written with '=': --extra='--hidden-dim 64'"""
    arm_extra: str = ""
    """more flags for every online arm (ones a --resume may change): --arm-extra='--edis-ratio 0.25'"""


def main(a: Cli) -> None:
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    study_command = " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    budgets = {}
    rel = lambda cmd: " ".join(["python"] + cmd[1:]).replace(ROOT + "/", "")  # noqa: E731

    def run(key: str, cmd: list, log: str) -> None:
        t0 = time.time()
        run_logged(cmd, log, env, cwd=ROOT)
        record_run(a.out, key, {"command": rel(cmd), "threads": a.threads, "wall_s": round(time.time() - t0, 1),
                                "budgets": budgets[key.split("/")[0]]}, study_command)
        print(f"{key}: {time.time() - t0:.0f} s", flush=True)

    for seed in a.seeds:
        for algo in a.algos:
            b = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in BUDGETS[algo].items()}
            budgets[algo] = b
            base = os.path.join(a.out, algo, f"seed{seed}")
            script = f"edis_{algo}.py"
            offline_dir = os.path.join(base, "offline")
            if not os.path.exists(os.path.join(offline_dir, "summary.json")):
                resume = ["--resume", offline_dir] if os.path.exists(os.path.join(offline_dir, "checkpoint.pt")) else []
                run(f"{algo}/seed{seed}/offline", [
                    sys.executable, script, "--env", a.env, "--seed", str(seed), "--output-dir", offline_dir,
                    "--offline-steps", str(b["offline_steps"]), "--online-steps", "0",
                    "--eval-every", str(b["eval_every"]), "--eval-episodes", str(a.eval_episodes),
                    "--edis-retrain-every", str(b["retrain_every"]), "--checkpoint-every", str(b["offline_steps"]),
                    *shlex.split(a.extra), *resume], offline_dir + ".log")
            for arm in a.arms:
                flags = ARM_FLAGS[arm]
                arm_dir = os.path.join(base, arm)
                if os.path.exists(os.path.join(arm_dir, "summary.json")):
                    print(f"{algo}/seed{seed}/{arm}: done, skipped")
                    continue
                if not os.path.exists(arm_dir):  # a fresh copy of the offline phase's folder, then continue it
                    shutil.copytree(offline_dir, arm_dir)
                    os.remove(os.path.join(arm_dir, "summary.json"))
                run(f"{algo}/seed{seed}/{arm}", [sys.executable, script, "--resume", arm_dir, "--online-steps",
                                                 str(b["online_steps"]), *flags, *shlex.split(a.arm_extra)],
                    arm_dir + ".log")


if __name__ == "__main__":
    main(tyro.cli(Cli))
