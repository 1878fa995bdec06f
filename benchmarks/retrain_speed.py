"""One EDIS retrain's time, side by side: the code before the speed work against today's, fp32 and bf16.

    python benchmarks/retrain_speed.py --baseline fc93593 --pairs 5   # ~15 min with nothing else running
    -> benchmarks/results/retrain_speed.json and the table of docs/results.md (study 4)

What is timed is benchmarks/retrain_profile.py's retrain: edis_iql.py's own functions at the CPU preset and PointMaze
sizes (D = 12, denoiser 256 x 3, 12,000 denoiser steps, 2,048 x 10 negatives per energy set, 100 InfoNCE steps,
20,000 guided samples of 32 Heun steps, the paper's form), each part at a fraction of its count and scaled to the full
count, one thread. Each configuration runs in a fresh process; the configurations alternate within every pair, so
all feel the same machine. The baseline's code is a git worktree of --baseline (benchmarks/runs/, not committed).
The committed results also hold two rows of an EDIS `--compile` (torch.compile of the denoiser and the energies,
97e915e): not faster here (docs/results.md, study 4), so the flag and its rows here were removed.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, A = 4, 2
FULL = dict(diffusion_steps=12_000, negatives=2048 * 10 * 3 + 2048, infonce_steps=100, samples=20_000)
PART = dict(diffusion_steps=600, pool=256, infonce_steps=50, samples=2_000)
SMALL = dict(diffusion_steps=20, pool=16, infonce_steps=2, samples=100)  # warm-up
CONFIGS = {"baseline fp32": ("baseline", False), "today fp32": ("today", False),  # name: (code, bf16)
           "baseline bf16": ("baseline", True), "today bf16": ("today", True)}


def parts(m, g, codec, x, online, state, n: dict) -> dict:
    """Seconds of each part at the counts ``n``, wired as edis_retrain wires them."""
    cond = torch.stack([codec.mask(codec.s), codec.mask(codec.s, codec.a)])
    out, t = {}, time.perf_counter()
    den, _ = m.train_diffusion(x, n["diffusion_steps"], 256, 3, g, cond)
    out["denoiser training"] = time.perf_counter() - t
    energies = state.energies
    x_on = codec.encode(online.sample(n["pool"], g))
    sample = lambda k, known=None, mask=None: m.sample_chunked(den, k, codec.dim, 32, g, known=known,  # noqa: E731
                                                               known_mask=mask)
    t = time.perf_counter()
    with torch.no_grad():
        sets = m.contrastive_sets(("state", "policy", "transition"), sample, codec, x_on, x_on, None, 10)
    out["conditional sampling of the negatives"] = time.perf_counter() - t
    sigmas = m.karras_sigmas(32, codec.mean.device)[:-1]
    t = time.perf_counter()
    m.train_energies(energies, state.energy_opt, sets, sigmas, n["infonce_steps"], g)
    out["InfoNCE steps"] = time.perf_counter() - t
    t = time.perf_counter()
    m.sample_chunked(den, n["samples"], codec.dim, 32, g, guidance=m.make_guidance(energies, {},
                                                                                   m.guided_dims(codec, False)))
    out["guided generation"] = time.perf_counter() - t
    return out


def measure_one(code: str, bf16: bool) -> dict:
    """In this process: the retrain's seconds by part, scaled to the full counts, after a warm-up."""
    torch.set_num_threads(1)
    sys.path.insert(0, code)
    import edis_iql as m
    from utils.run import bf16_autocast

    g = torch.Generator().manual_seed(0)
    codec = m.TransitionCodec(S, A, torch.device("cpu"))
    x = torch.randn(100_000, codec.dim, generator=g)
    x[:, codec.d] = (x[:, codec.d] > 2).float()
    online = m.ReplayBuffer(S, A, 10_000, torch.device("cpu"))
    online.add_batch(codec.decode(torch.randn(10_000, codec.dim, generator=g)))
    state = m.EDISState(codec)
    m.build_energies(state, False, (0, 1))
    with bf16_autocast(torch.device("cpu"), bf16):
        parts(m, g, codec, x, online, state, SMALL)
        measured = parts(m, g, codec, x, online, state, PART)
    scale = {"denoiser training": FULL["diffusion_steps"] / PART["diffusion_steps"],
             "conditional sampling of the negatives": FULL["negatives"] / (PART["pool"] * 31),
             "InfoNCE steps": FULL["infonce_steps"] / PART["infonce_steps"],
             "guided generation": FULL["samples"] / PART["samples"]}
    full = {k: round(v * scale[k], 2) for k, v in measured.items()}
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
    tree = os.path.join(ROOT, "benchmarks", "runs", "retrain_speed", a.baseline)
    if not os.path.isdir(tree):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, a.baseline], check=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
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
                    "speedup_vs_" + base.replace(" ", "_"): {"median": round(statistics.median(ratios), 3),
                                                            "min": round(min(ratios), 3), "max": round(max(ratios), 3)}}
    result = {"baseline_commit": a.baseline, "commit": commit, "uncommitted_changes": dirty, "pairs": a.pairs,
              "threads": 1, "torch": torch.__version__, "cpu": cpu_name(), "full_counts": FULL,
              "measured_counts": PART, "configs": {c: dict(zip(("code", "bf16"), CONFIGS[c]))
                                                   for c in a.configs}, "results": table}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for c, r in table.items():
        s = r["speedup_vs_" + base.replace(" ", "_")]
        print(f"{c:>22}: {r['total_s_median']:6.1f} s  {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})")
    print(a.out)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main(tyro.cli(Cli))
