"""Study 1b of docs/results.md: ReVal vs GRPO with both sides tuned by one protocol, 120-round runs.

    python benchmarks/llm_tuning.py                           # every phase, two runs at a time (one per core)
    python benchmarks/llm_tuning.py --phases tune final       # only the main setting

The protocol (docs/results.md, "Tuning protocol") in phases; each phase's runs go to ``<out>/<phase>/<method>/<config>/
seed<k>``, finished runs (summary.json present) are skipped, so an interrupted study is continued by running the same
command again:

* ``tune``: the main setting (16 prompts x 8 rollouts per round), 9 configurations per method, one seed (11), scored
  on the built-in task's **validation** split (disjoint from the eval split and from training). GRPO: learning rate x
  loss type (grpo / dr_grpo / dapo). ReVal: its defaults, then one change at a time: learning rate, beta, K, reference
  reset period, reward form. Score = mean sampled accuracy (mean@4) over the last three evaluations (rounds 100-120).
* ``final``: each method's best configuration, fresh seeds (1 2 3), evaluated on the eval split.
* ``n1-tune`` / ``n1-final``: the same for 32 prompts x 1 rollout per round (ReVal Sec. 5.4), 3 configurations per
  method around each one's tuned main configuration. ReVal's buffer holds 40 rounds as the paper's (5,120
  trajectories of 128 one-rollout prompts), with K = 8 (Fig. 6) at the tuned and a 4x smaller learning rate, or K = 2.
* ``beta``: ReVal's tuned configuration at other betas (ReVal Sec. 5.5), eval split, ``--beta-seeds``.

The selections are written to ``<out>/<phase>/selection.json``. Extract tables and figures with
``benchmarks/make_results.py``.
"""

import dataclasses
import json
import os
import queue
import statistics
import sys
import threading
import time
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from study_common import llm_run_flags, record_run, run_logged  # noqa: E402

MAIN = ["--prompts-per-round", "16", "--group-size", "8"]
N1 = ["--prompts-per-round", "32", "--group-size", "1"]
LRS = (2.5e-5, 5e-5, 1e-4)
REVAL_BASE = {"learning-rate": 5e-5, "beta": 0.1, "updates-per-round": 2, "ref-reset-every": 0,
              "reward-mode": "group_mean"}  # the script's defaults for the built-in model
TUNE_SEED = 11
SCORE_LAST = 3  # evaluations averaged for the validation score
Phase = Literal["tune", "final", "n1-tune", "n1-final", "beta"]


SHORT = {"learning-rate": "lr", "loss-type": "", "beta": "beta", "updates-per-round": "K", "ref-reset-every": "reset",
         "reward-mode": "", "buffer-size": "buf"}  # run folder names


def name_of(cfg: dict) -> str:
    return "_".join(f"{SHORT[k]}{v}" for k, v in cfg.items())


def flags_of(cfg: dict) -> list:
    return [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


def tune_grid() -> dict:
    """9 configurations per method (the same number for both)."""
    grpo = [{"learning-rate": lr, "loss-type": loss} for lr in LRS for loss in ("grpo", "dr_grpo", "dapo")]
    changes = [{"learning-rate": 2.5e-5}, {"learning-rate": 1e-4}, {"beta": 0.03}, {"beta": 0.3},
               {"updates-per-round": 1}, {"updates-per-round": 4}, {"ref-reset-every": 40},
               {"reward-mode": "binary"}]
    reval = [dict(REVAL_BASE)] + [dict(REVAL_BASE, **c) for c in changes]
    return {"grpo": grpo, "reval": reval}


def n1_grid(best: dict) -> dict:
    """3 configurations per method around each method's tuned main-setting configuration."""
    g, r = best["grpo"], best["reval"]
    grpo = [dict(g, **{"learning-rate": g["learning-rate"] * f}) for f in (0.5, 1.0, 2.0)]
    buf = {"buffer-size": 40 * 32}
    reval = [dict(r, **buf, **{"updates-per-round": 8}),
             dict(r, **buf, **{"updates-per-round": 8, "learning-rate": r["learning-rate"] / 4}),
             dict(r, **buf, **{"updates-per-round": 2})]
    return {"grpo": grpo, "reval": reval}


@dataclasses.dataclass
class Cli:
    phases: tuple[Phase, ...] = ("tune", "final", "n1-tune", "n1-final", "beta")
    """phases to run, in order (a phase reads the selection of the tuning phase before it)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of the final runs (the tuning runs use seed 11)"""
    beta_seeds: tuple[int, ...] = (1,)
    """seeds of the beta-sensitivity runs (the tuned beta has the final runs' seeds)"""
    betas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    """betas of the sensitivity phase"""
    rounds: int = 120
    """generation rounds per run"""
    eval_every: int = 10
    """evaluate every this many rounds"""
    eval_prompts: int = 256
    """prompts per evaluation (validation split when tuning, eval split otherwise)"""
    eval_samples: int = 4
    """k of the sampled mean@k accuracy"""
    workers: int = 2
    """runs at a time, worker i pinned to core i (taskset) with one torch thread"""
    out: str = os.path.join(ROOT, "benchmarks", "runs", "llm_tuning")
    """output folder of the study"""
    extra: str = ""
    """more flags for every run, written with '=': --extra='--model path/to/model'"""


def validation_score(run_dir: str) -> float:
    """Mean sampled accuracy over the run's last SCORE_LAST evaluations (read from its TensorBoard log)."""
    from make_results import scalars

    sampled = scalars(run_dir)["eval/accuracy_sampled"]
    return statistics.mean(v for _, v in sampled[-SCORE_LAST:])


def select(a: Cli, phase: str, grid: dict) -> dict:
    """Best configuration per method by validation score; writes <out>/<phase>/selection.json."""
    path = os.path.join(a.out, phase, "selection.json")
    result = {}
    for method, cfgs in grid.items():
        scores = {name_of(c): validation_score(os.path.join(a.out, phase, method, name_of(c), f"seed{TUNE_SEED}"))
                  for c in cfgs}
        best = max(cfgs, key=lambda c: scores[name_of(c)])  # a tie goes to the earlier configuration of the grid
        result[method] = {"best": best, "best_name": name_of(best), "scores": scores}
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return {m: r["best"] for m, r in result.items()}


def run_jobs(a: Cli, jobs: list) -> None:
    """jobs: (key, script, flags); up to a.workers at a time, worker i on core i; longest-looking first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    common = llm_run_flags(a.rounds, a.eval_every, a.eval_prompts, a.eval_samples, a.extra)
    study_command = " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    todo: queue.Queue = queue.Queue()
    for job in sorted(jobs, key=lambda j: -int(dict(zip(j[2][::2], j[2][1::2])).get("--updates-per-round", 1))):
        if os.path.exists(os.path.join(a.out, job[0], "summary.json")):
            print(f"{job[0]}: done, skipped", flush=True)
        else:
            todo.put(job)
    lock, failed = threading.Lock(), []

    def worker(i: int) -> None:
        while True:
            try:
                key, script, flags = todo.get_nowait()
            except queue.Empty:
                return
            run_dir = os.path.join(a.out, key)
            cmd = [sys.executable, script, "--output-dir", run_dir, "--overwrite", *common, *flags]
            pin = ["taskset", "-c", str(i % (os.cpu_count() or 1))] if a.workers > 1 else []
            t0 = time.time()
            try:
                run_logged(pin + cmd, run_dir + ".log", env, cwd=ROOT)
            except SystemExit as e:  # run_logged exits with a one-line message on failure
                with lock:
                    failed.append(str(e))
                continue
            with lock:
                record_run(a.out, key, {"command": " ".join(["python"] + cmd[1:]).replace(ROOT + "/", ""),
                                        "threads": 1, "wall_s": round(time.time() - t0, 1)}, study_command)
            print(f"{key}: {time.time() - t0:.0f} s", flush=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        sys.exit("\n".join(failed))


SCRIPTS = {"grpo": "grpo_llm.py", "reval": "reval_llm.py"}


def phase_jobs(a: Cli, phase: str, grid: dict, setting: list, split: str, seeds) -> list:
    return [(os.path.join(phase, method, name_of(c), f"seed{s}"), SCRIPTS[method],
             ["--seed", str(s), "--eval-split", split, *setting, *flags_of(c)])
            for method, cfgs in grid.items() for c in cfgs for s in seeds]


def main(a: Cli) -> None:
    os.makedirs(a.out, exist_ok=True)
    grid = tune_grid()
    for phase in a.phases:
        t0 = time.time()
        if phase == "tune":
            run_jobs(a, phase_jobs(a, phase, grid, MAIN, "validation", (TUNE_SEED,)))
            select(a, "tune", grid)
        elif phase == "final":
            best = select(a, "tune", grid)
            run_jobs(a, phase_jobs(a, phase, {m: [c] for m, c in best.items()}, MAIN, "test", a.seeds))
        elif phase == "n1-tune":
            g1 = n1_grid(select(a, "tune", grid))
            run_jobs(a, phase_jobs(a, phase, g1, N1, "validation", (TUNE_SEED,)))
            select(a, "n1-tune", g1)
        elif phase == "n1-final":
            best1 = select(a, "n1-tune", n1_grid(select(a, "tune", grid)))
            run_jobs(a, phase_jobs(a, phase, {m: [c] for m, c in best1.items()}, N1, "test", a.seeds))
        elif phase == "beta":
            r = select(a, "tune", grid)["reval"]
            cfgs = [dict(r, beta=b) for b in a.betas if b != r["beta"]]
            run_jobs(a, phase_jobs(a, phase, {"reval": cfgs}, MAIN, "test", a.beta_seeds))
        print(f"phase {phase}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Cli))
