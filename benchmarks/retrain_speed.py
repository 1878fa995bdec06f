"""One EDIS retrain's time, side by side: the code before the speed work against today's, fp32 and bf16.

    python benchmarks/retrain_speed.py --baseline fc93593 --pairs 5   # ~15 min with nothing else running
    -> benchmarks/results/retrain_speed.json and the table of docs/results.md (study 4)

What is timed is benchmarks/retrain_profile.py's retrain (its setup, parts and scaling): edis_iql.py's own functions
at the CPU preset and PointMaze sizes (D = 12, denoiser 256 x 3, 12,000 denoiser steps, 2,048 x 10 negatives per
energy set, 100 InfoNCE steps, 20,000 guided samples of 32 Heun steps, the paper's form), each part at a fraction of
its count and scaled to the full count, one thread. Each configuration runs in a fresh process; the configurations
alternate within every pair, so all feel the same machine. The baseline's code is a git worktree of --baseline
(benchmarks/runs/, not committed). The committed results also hold two rows of an EDIS `--compile` (torch.compile of
the denoiser and the energies, 97e915e): not faster here (docs/results.md, study 4), so the flag and its rows here
were removed.
"""

import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys

import torch
import tyro
from study_common import machine_info, short_commit, spread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(diffusion_steps=20, pool=16, infonce_steps=2, samples=100)  # warm-up
CONFIGS = {"baseline fp32": ("baseline", False), "today fp32": ("today", False),  # name: (code, bf16)
           "baseline bf16": ("baseline", True), "today bf16": ("today", True)}


def measure_one(code: str, bf16: bool) -> dict:
    """In this process: the retrain's seconds by part (retrain_profile.py's parts, with ``code``'s edis_iql.py),
    scaled to the full counts, after a warm-up."""
    torch.set_num_threads(1)
    sys.path.insert(0, code)
    importlib.import_module("edis_iql")  # the code under test, cached first: retrain_profile below times it
    bf16_autocast = importlib.import_module("utils.run").bf16_autocast
    rp = importlib.import_module("retrain_profile")

    g, codec, x, online, state = rp.setup()
    with bf16_autocast(torch.device("cpu"), bf16):
        rp.parts(g, codec, x, online, state, SMALL)
        full = {k: round(v, 2) for k, v in rp.to_full(rp.parts(g, codec, x, online, state, rp.PART)).items()}
    return {"seconds": full, "total_s": round(sum(full.values()), 2)}


@dataclasses.dataclass
class Cli:
    baseline: str = "fc93593"
    """the commit before the speed work (its edis_iql.py is timed as 'baseline')"""
    pairs: int = 5
    """rounds; each runs every configuration once, in this order, each in a fresh process"""
    configs: tuple[str, ...] = tuple(CONFIGS)
    """which configurations"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "retrain_speed.json")
    """the results file (committed)"""
    one: str = ""
    """internal: time one configuration in this process and print its JSON"""


def main(a: Cli) -> None:
    if a.one:
        code, bf16 = json.loads(a.one)
        print(json.dumps(measure_one(code, bf16)))
        return
    rp = importlib.import_module("retrain_profile")  # only here: a --one process imports its own edis_iql first

    tree = os.path.join(ROOT, "benchmarks", "runs", "retrain_speed", a.baseline)
    if not os.path.isdir(tree):
        p = subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, a.baseline], capture_output=True,
                           text=True)
        if p.returncode != 0:
            sys.exit(f"error: --baseline {a.baseline}: no worktree of it ({p.stderr.strip().splitlines()[-1]})")
    commit = short_commit()
    dirty = machine_info()["uncommitted_changes"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {c: [] for c in a.configs}
    for i in range(a.pairs):
        for c in a.configs:
            code, bf16 = CONFIGS[c]
            arg = json.dumps([tree if code == "baseline" else ROOT, bf16])
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", arg], capture_output=True,
                               text=True, env=env, cwd=ROOT)
            if p.returncode != 0:
                sys.exit(f"{c}: failed\n{p.stderr[-2000:]}")
            runs[c].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"pair {i + 1}/{a.pairs} {c:>22}: {runs[c][-1]['total_s']:6.1f} s", flush=True)
    base = "baseline fp32" if "baseline fp32" in runs else a.configs[0]
    table = {}
    for c, rs in runs.items():
        ratios = [b["total_s"] / r["total_s"] for b, r in zip(runs[base], rs)]  # pair by pair
        table[c] = {"total_s_median": statistics.median(r["total_s"] for r in rs),
                    "total_s": [r["total_s"] for r in rs],
                    "parts_s_median": {k: statistics.median(r["seconds"][k] for r in rs) for k in rs[0]["seconds"]},
                    "speedup_vs_" + base.replace(" ", "_"): spread(ratios)}
    result = {"baseline_commit": a.baseline, "commit": commit, "uncommitted_changes": dirty, "pairs": a.pairs,
              "threads": 1, "torch": torch.__version__, "cpu": machine_info()["cpu"],
              "full_counts": rp.FULL, "measured_counts": rp.PART,
              "configs": {c: dict(zip(("code", "bf16"), CONFIGS[c])) for c in a.configs}, "results": table}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for c, r in table.items():
        s = r["speedup_vs_" + base.replace(" ", "_")]
        print(f"{c:>22}: {r['total_s_median']:6.1f} s  {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})")
    print(a.out)


if __name__ == "__main__":
    main(tyro.cli(Cli))
