"""Helpers shared by the benchmark study drivers: what machine and commit a study ran on, and running one command
with its output kept in a log file."""

import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info() -> dict:
    """CPU model, core count, torch version and the git commit (with a flag for uncommitted changes)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "--", "*.py")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def spread(ratios: list) -> dict:
    """Median and range of paired ratios (the speed benchmarks' summary)."""
    import statistics

    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def flops_of(fn) -> int:
    """Matrix-product FLOPs (mm, addmm, bmm, ...: torch's flop_registry) that fn() runs. A plain dispatch mode, not
    FlopCounterMode, whose module tracking breaks on torch.autograd.grad of a leaf (the official EDIS sampler)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket in flop_registry:
                self.total += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
            return out

    with Count() as counter:
        fn()
    return counter.total


def short_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def llm_run_flags(rounds: int, eval_every: int, eval_prompts: int, eval_samples: int, extra: str) -> list:
    """The flags every run of an LLM study shares: budget, evaluation, one checkpoint at the end, and --extra."""
    import shlex

    return ["--total-rounds", str(rounds), "--eval-every", str(eval_every), "--eval-prompts", str(eval_prompts),
            "--eval-samples", str(eval_samples), "--checkpoint-every", str(rounds), *shlex.split(extra)]


def run_logged(cmd: list, log_path: str, env: dict, cwd: str = ROOT) -> None:
    """Run cmd with stdout and stderr going to log_path; exit with a one-line message if it fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if rc != 0:
        sys.exit(f"error: {' '.join(cmd)} failed with exit code {rc}; see {log_path}")


def record_run(out_dir: str, key: str, entry: dict, study_command: str, **extra) -> None:
    """Add one finished run to <out_dir>/manifest.json: its command, timing and commit, plus the machine and the study
    commands. Read-modify-write with an atomic rename, so studies started side by side on one folder keep every run."""
    path = os.path.join(out_dir, "manifest.json")
    manifest = json.load(open(path)) if os.path.exists(path) else {"runs": {}, "study_commands": []}
    info = machine_info()
    manifest.update({k: v for k, v in info.items() if k != "commit"}, **extra)
    if study_command not in manifest.setdefault("study_commands", []):
        manifest["study_commands"].append(study_command)
    manifest["runs"][key] = dict(entry, commit=info["commit"] + ("+changes" if info["uncommitted_changes"] else ""))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, path)
