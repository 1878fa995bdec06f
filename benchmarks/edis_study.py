"""Study 2 of docs/results.md: the paper's EDIS, EDIS with --edis-extras, plain fine-tuning and EDIS's batches
without synthetic rows, after the same offline phase, for IQL and Cal-QL on PointMaze (locally collected data).

    python benchmarks/edis_study.py --algos calql --seeds 1 2 3 4 5 --code <commit> --commit-results

Per algorithm and seed the offline phase runs once (``--online-steps 0``); its folder is copied once per arm and each
copy is continued with ``--resume`` for the same online budget. The arms start from the same agent and see the same
env reset seeds and batch seeds: they differ only in how the online batches are made.
  noedis       plain fine-tuning (uniform over offline + online replay, CORL)
  paper        EDIS as the paper (--edis)
  extras       EDIS with --edis-extras
  online_only  EDIS's batches without synthetic rows: online rows only after the first "retrain", whose tiny model
               is never sampled from (--edis-ratio 0). It tells the loss of the offline rows from the synthetic data.
  paper_bf16   the paper's form under bf16 autocast (fp32 weights): does bf16 lose anything against fp32?
The endpoint is fixed before the runs: the mean normalized score of the last 3 evaluations (20 episodes each).

**The evidence accumulates across sessions.** ``--code`` pins the scripts' commit: they run from a git worktree of it,
so one arm never mixes code versions. Each finished run is extracted at once to a small JSON file in ``--results``
(summary, evaluation curve, config, commit; committed to git with ``--commit-results``), and a run whose file exists
is skipped, so the command continues where any earlier session stopped. The run folders (``--out``) are not
committed: a missing offline phase is recomputed, and its weights are checked bit for bit against the hash its
record holds.
"""

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from make_results import edis_run_record  # noqa: E402
from study_common import machine_info, run_logged  # noqa: E402

# offline updates, online env steps, evaluation and EDIS retrain intervals (online steps), per algorithm
BUDGETS = {
    "iql": dict(offline_steps=10_000, online_steps=10_000, eval_every=2_000, retrain_every=2_500),
    "calql": dict(offline_steps=4_000, online_steps=10_000, eval_every=2_000, retrain_every=2_500),
}
ARM_FLAGS = {"noedis": ["--no-edis"], "paper": ["--edis", "--no-edis-extras"], "extras": ["--edis", "--edis-extras"],
             "online_only": ["--edis", "--edis-ratio", "0", "--edis-diffusion-steps", "10", "--edis-num-samples", "10",
                             "--edis-sample-steps", "2", "--energy-pool", "16", "--energy-steps", "1"],
             # precision check (the speed issue): the paper's form under bf16 autocast, fp32 weights
             "paper_bf16": ["--edis", "--no-edis-extras", "--bf16"]}
RESULTS = os.path.join(ROOT, "benchmarks", "results", "edis_study")


@dataclasses.dataclass
class Cli:
    algos: tuple[Literal["iql", "calql"], ...] = ("iql", "calql")
    """algorithms to run"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every run"""
    arms: tuple[Literal["noedis", "paper", "extras", "online_only", "paper_bf16"], ...] = (
        "noedis", "online_only", "paper", "extras")
    """which online arms to run, in this order"""
    code: Optional[str] = None
    """commit of the scripts to run (from a git worktree); default: this checkout as it is"""
    commit_results: bool = False
    """git-commit each run's results file as soon as it is written"""
    env: str = "pointmaze-umaze"
    """task of every run"""
    eval_episodes: int = 20
    """episodes per evaluation"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS)"""
    out: str = os.path.join(ROOT, "benchmarks", "runs", "edis")
    """the runs' folders (not committed)"""
    results: str = RESULTS
    """one JSON file per finished run (committed)"""
    offline_steps: Optional[int] = None
    """override BUDGETS[algo]['offline_steps'] for every algorithm"""
    online_steps: Optional[int] = None
    """override BUDGETS[algo]['online_steps'] for every algorithm"""
    eval_every: Optional[int] = None
    """override BUDGETS[algo]['eval_every'] for every algorithm"""
    retrain_every: Optional[int] = None
    """override BUDGETS[algo]['retrain_every'] for every algorithm"""
    extra: str = ""
    """more flags for the offline phase (the arms inherit its config), written with '=': --extra='--hidden-dim 64'"""


def git(*args: str, cwd: str = ROOT) -> str:
    p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: git {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout.strip()


def code_dir(commit: Optional[str], out: str) -> tuple:
    """(folder to run the scripts in, full commit): a worktree of ``commit``, or this checkout (flagged if its
    Python files differ from HEAD)."""
    if commit is None:
        dirty = git("status", "--porcelain", "--", "*.py", "utils")
        return ROOT, git("rev-parse", "HEAD") + ("+changes" if dirty else "")
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    path = os.path.join(out, "code", sha[:12])
    if not os.path.exists(os.path.join(path, "edis_iql.py")):
        shutil.rmtree(path, ignore_errors=True)
        git("worktree", "prune")
        git("worktree", "add", "--detach", path, sha)
    return path, sha


def weights_hash(run_dir: str) -> str:
    """sha256 of the checkpoint's network weights, tensor by tensor in key order."""
    import torch

    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for k, v in sorted(ckpt["agent"].items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def write_result(path: str, record: dict, commit: bool) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    if commit:  # only this file, whatever else the checkout holds; retried while another git command holds the lock
        rel = os.path.relpath(path, ROOT)
        for attempt in range(20):
            add = subprocess.run(["git", "add", "--", rel], cwd=ROOT, capture_output=True)
            done = add.returncode == 0 and subprocess.run(
                ["git", "commit", "-q", "-m", f"study 2: {os.path.basename(path)[:-5]} (results)", "--", rel],
                cwd=ROOT, capture_output=True).returncode == 0
            if done:
                break
            time.sleep(3 + attempt)
        else:
            print(f"warning: could not commit {rel}; it is written, commit it by hand", file=sys.stderr)


def main(a: Cli) -> None:
    a.out, a.results = os.path.abspath(a.out), os.path.abspath(a.results)  # the runs start in the code's folder
    os.makedirs(a.out, exist_ok=True)
    cwd, commit = code_dir(a.code, a.out)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    machine = {k: v for k, v in machine_info().items() if k not in ("commit", "uncommitted_changes")}
    study_command = " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])

    def run(cmd: list, log: str) -> float:
        t0 = time.time()
        run_logged(cmd, log, env, cwd=cwd)
        return round(time.time() - t0, 1)

    for seed in a.seeds:
        for algo in a.algos:
            b = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in BUDGETS[algo].items()}
            base, script = os.path.join(a.out, algo, f"seed{seed}"), f"edis_{algo}.py"
            result = lambda name: os.path.join(a.results, f"{algo}-seed{seed}-{name}.json")  # noqa: E731,B023
            todo = [arm for arm in a.arms if not os.path.exists(result(arm))]
            for arm in set(a.arms) - set(todo):
                print(f"{algo}/seed{seed}/{arm}: results committed, skipped")
            if not todo:
                continue
            offline_dir = os.path.join(base, "offline")
            if not os.path.exists(os.path.join(offline_dir, "summary.json")):
                resume = ["--resume", offline_dir] if os.path.exists(os.path.join(offline_dir, "checkpoint.pt")) else []
                cmd = [sys.executable, script, "--env", a.env, "--seed", str(seed), "--output-dir", offline_dir,
                       "--offline-steps", str(b["offline_steps"]), "--online-steps", "0",
                       "--eval-every", str(b["eval_every"]), "--eval-episodes", str(a.eval_episodes),
                       "--edis-retrain-every", str(b["retrain_every"]), "--checkpoint-every", str(b["offline_steps"]),
                       *shlex.split(a.extra), *resume]
                wall = run(cmd, offline_dir + ".log")
                summary = json.load(open(os.path.join(offline_dir, "summary.json")))
                rec = {"algo": algo, "seed": seed, "arm": "offline", "commit": commit, "weights_sha256":
                       weights_hash(offline_dir), "offline_score": summary["offline_normalized_score"],
                       "command": " ".join(["python"] + cmd[1:]).replace(ROOT + "/", ""), "wall_s": wall,
                       "threads": a.threads, "budgets": b}
                if os.path.exists(result("offline")):  # recomputed: it must be the committed phase, bit for bit
                    old = json.load(open(result("offline")))
                    if old["weights_sha256"] != rec["weights_sha256"]:
                        sys.exit(f"error: the recomputed offline phase {offline_dir} differs from the one recorded in "
                                 f"{result('offline')} (commit {old['commit']}); its arms cannot be paired")
                    print(f"{algo}/seed{seed}/offline: recomputed, weights equal to the recorded ones bit for bit")
                else:
                    write_result(result("offline"), rec, a.commit_results)
                print(f"{algo}/seed{seed}/offline: {wall:.0f} s", flush=True)
            for arm in todo:
                arm_dir = os.path.join(base, arm)
                if not os.path.exists(arm_dir):  # a fresh copy of the offline phase's folder, then continue it
                    shutil.copytree(offline_dir, arm_dir)
                    os.remove(os.path.join(arm_dir, "summary.json"))
                cmd = [sys.executable, script, "--resume", arm_dir, "--online-steps", str(b["online_steps"]),
                       *ARM_FLAGS[arm]]
                wall = run(cmd, arm_dir + ".log")
                summary = json.load(open(os.path.join(arm_dir, "summary.json")))
                rec = {"algo": algo, "seed": seed, "arm": arm, "commit": commit, **edis_run_record(arm_dir, summary),
                       "command": " ".join(["python"] + cmd[1:]).replace(ROOT + "/", ""), "wall_s": wall,
                       "threads": a.threads, "budgets": b, "study_command": study_command, "machine": machine,
                       "config": json.load(open(os.path.join(arm_dir, "config.json")))["args"]}
                write_result(result(arm), rec, a.commit_results)
                print(f"{algo}/seed{seed}/{arm}: {wall:.0f} s, endpoint "
                      f"{sum(e['score'] for e in rec['evals'][-3:]) / 3:.1f}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Cli))
