"""IQL and Cal-QL update throughput against CORL's, side by side, at AntMaze sizes.

    python benchmarks/peer_corl.py --corl DIR --pairs 5     # ~15 min, nothing else running -> results/peer_corl.json
    python benchmarks/peer_corl.py --corl DIR --flops       # FLOPs per update, each side -> peer_corl_flops.json

DIR holds CORL's algorithms/finetune/iql.py and cal_ql.py (corl-team/CORL at commit eeeeef2), outside this
repository and never copied into it. To get it: the library's `fetch` of github:corl-team/CORL, then
`git --git-dir MIRROR archive eeeeef2 algorithms/finetune | tar -x -C DIR`. Their module-level imports of d4rl, gym,
pyrallis and wandb are stubbed (none is used by the classes timed here).

The same work on both sides: observation 29, action 8, batch 256, random data (throughput does not depend on values),
fp32. IQL: CORL's ImplicitQLearning.train (2 x 256 twin critic, V, Gaussian actor) against edis_iql.py's iql_update.
Cal-QL: CORL's CalQL.train with its antmaze-large config (5 hidden layers, 10 CQL actions, Lagrange, max-target
backup, importance sampling, automatic entropy) against edis_calql.py's calql_update with its antmaze preset
(benchmarks/update_throughput.py, which also times ours). Each measurement a fresh process; CORL and ours alternate;
1 and 2 threads (OMP_WAIT_POLICY=PASSIVE). Ours under --bf16 is measured beside, reported apart (CORL has no bf16).
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import torch
import tyro
from study_common import flops_of, short_commit, spread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORL_COMMIT = "eeeeef2"
OBS, ACT, B = 29, 8, 256
UPDATES = {"iql": (100, 1000), "calql": (10, 40)}  # (warm-up, timed) per measurement


def corl_module(corl: str, name: str):
    for stub in ("d4rl", "gym", "wandb"):
        sys.modules.setdefault(stub, types.ModuleType(stub))
    sys.modules["gym"].Env = object
    sys.modules.setdefault("pyrallis", types.SimpleNamespace(wrap=lambda *a, **k: (lambda f: f)))
    sys.path.insert(0, os.path.join(corl, "algorithms", "finetune"))
    return __import__(name)


def corl_step(corl: str, algo: str):
    """CORL's update at AntMaze sizes on 20 fixed random batches: step(i) runs one on batch i % 20."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randn(B, OBS, generator=g), torch.rand(B, ACT, generator=g) * 2 - 1,
                torch.randn(B, 1, generator=g), torch.randn(B, OBS, generator=g), torch.zeros(B, 1),
                torch.randn(B, 1, generator=g) * 10] for _ in range(20)]
    if algo == "iql":
        c = corl_module(corl, "iql")
        q, v, actor = c.TwinQ(OBS, ACT), c.ValueFunction(OBS), c.GaussianPolicy(OBS, ACT, 1.0)
        trainer = c.ImplicitQLearning(1.0, actor, torch.optim.Adam(actor.parameters(), 3e-4), q,
                                      torch.optim.Adam(q.parameters(), 3e-4), v,
                                      torch.optim.Adam(v.parameters(), 3e-4), iql_tau=0.9, beta=10.0)
        train = lambda b: trainer.train(b[:5])  # noqa: E731
    else:
        c = corl_module(corl, "cal_ql")
        q1, q2 = (c.FullyConnectedQFunction(OBS, ACT, True, 5) for _ in range(2))
        actor = c.TanhGaussianPolicy(OBS, ACT, 1.0, orthogonal_init=True)
        trainer = c.CalQL(critic_1=q1, critic_2=q2, critic_1_optimizer=torch.optim.Adam(q1.parameters(), 3e-4),
                          critic_2_optimizer=torch.optim.Adam(q2.parameters(), 3e-4), actor=actor,
                          actor_optimizer=torch.optim.Adam(actor.parameters(), 1e-4), target_entropy=-float(ACT),
                          policy_lr=1e-4, qf_lr=3e-4, cql_n_actions=10, cql_importance_sample=True,
                          cql_lagrange=True, cql_target_action_gap=0.8, cql_alpha=5.0, cql_max_target_backup=True,
                          cql_clip_diff_min=-200.0, cql_clip_diff_max=np.inf, use_automatic_entropy_tuning=True)
        train = trainer.train
    return lambda i: train(batches[i % 20])


def corl_updates_per_s(corl: str, algo: str) -> float:
    step, (warm, n) = corl_step(corl, algo), UPDATES[algo]
    for i in range(warm):
        step(i)
    t = time.perf_counter()
    for i in range(n):
        step(i)
    return n / (time.perf_counter() - t)


def gflop_per_update(step) -> float:
    """Matrix-product FLOPs of one update (study_common.flops_of), after a first one."""
    step(0)
    return flops_of(lambda: step(1)) / 1e9


def count_flops(corl: str, algos: tuple, out: str) -> None:
    """--flops: the work of one update on each side, and with peer_corl.json's medians the FLOP rate each sustains."""
    import update_throughput as ut

    res = {"commit": short_commit(), "corl_commit": CORL_COMMIT, "torch": torch.__version__, "gflop_per_update": {}}
    speed = json.load(open(out)) if os.path.isfile(out) else None
    for algo in algos:
        ours = ut.make_step(ut.Cli(algo=algo))
        g = {"corl": gflop_per_update(corl_step(corl, algo)), "ours": gflop_per_update(lambda i: ours())}
        res["gflop_per_update"][algo] = {k: round(v, 3) for k, v in g.items()}
        line = f"{algo}: {g['ours']:.3f} GFLOP per update (CORL {g['corl']:.3f}, {g['corl'] / g['ours']:.2f}x ours)"
        for t in (1, 2):
            med = (speed or {}).get("summary", {}).get(f"{algo} {t}", {}).get("updates_per_s_median")
            if med:  # GFLOP/s = GFLOP per update x updates/s (peer_corl.json, measured at its own commit)
                rate = {k: round(g[k] * med[k], 1) for k in ("ours", "corl")}
                res.setdefault("gflop_per_s", {})[f"{algo} {t}"] = rate
                line += f"; {t} thread(s): ours {rate['ours']} GFLOP/s, CORL {rate['corl']}"
        print(line, flush=True)
    with open(os.path.join(os.path.dirname(out), "peer_corl_flops.json"), "w") as f:
        json.dump(res, f, indent=1)


def ours_updates_per_s(algo: str, threads: int, bf16: bool, env: dict) -> float:
    warm, n = UPDATES[algo]
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "update_throughput.py"), "--algo", algo, "--threads",
           str(threads), "--updates", str(n), "--warmup", str(warm)] + (["--bf16"] if bf16 else [])
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])["updates_per_s"]


@dataclasses.dataclass
class Cli:
    corl: str = ""
    """a folder with CORL's algorithms/finetune at eeeeef2 (see the module docstring)"""
    pairs: int = 5
    """rounds; each measures CORL, ours and ours under bf16 once per algorithm and thread count"""
    algos: tuple[str, ...] = ("iql", "calql")
    """which algorithms"""
    threads: tuple[int, ...] = (1, 2)
    """torch thread counts"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "peer_corl.json")
    """the results file (committed)"""
    flops: bool = False
    """count each side's matrix-product FLOPs per update instead (-> results/peer_corl_flops.json, with FLOP rates
    from the --out file's medians)"""
    one: str = ""
    """internal: 'corl ALGO THREADS', measured in this process"""


def main(a: Cli) -> None:
    if a.one:
        _, algo, threads = a.one.split()
        torch.set_num_threads(int(threads))
        print(corl_updates_per_s(a.corl, algo))
        return
    if not a.corl or not os.path.isfile(os.path.join(a.corl, "algorithms", "finetune", "iql.py")):
        sys.exit(f"error: --corl {a.corl or '(none)'} has no algorithms/finetune/iql.py: fetch github:corl-team/CORL "
                 f"and unpack commit {CORL_COMMIT} there (see --help)")
    if a.flops:
        count_flops(a.corl, a.algos, a.out)
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    runs = {f"{algo} {t}": {"corl": [], "ours": [], "ours_bf16": []} for algo in a.algos for t in a.threads}
    for _ in range(a.pairs):
        for key, r in runs.items():
            algo, t = key.split()
            env["OMP_NUM_THREADS"] = t
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--corl", a.corl, "--one",
                                f"corl {algo} {t}"], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(f"CORL {algo}: failed\n{p.stderr[-2000:]}")
            r["corl"].append(round(float(p.stdout.strip().splitlines()[-1]), 2))
            r["ours"].append(ours_updates_per_s(algo, int(t), False, env))
            r["ours_bf16"].append(ours_updates_per_s(algo, int(t), True, env))
            print(f"{key}: CORL {r['corl'][-1]}, ours {r['ours'][-1]}, ours bf16 {r['ours_bf16'][-1]} updates/s",
                  flush=True)
    summary = {}
    for key, r in runs.items():
        ratio = lambda k: [o / c for c, o in zip(r["corl"], r[k])]  # noqa: E731, B023  pair by pair
        summary[key] = {"updates_per_s_median": {k: statistics.median(v) for k, v in r.items()},
                        **{f"{k}_vs_corl": spread(ratio(k)) for k in ("ours", "ours_bf16")}}
    commit = short_commit()
    with open(a.out, "w") as f:
        json.dump({"commit": commit, "corl_commit": CORL_COMMIT, "torch": torch.__version__, "runs": runs,
                   "summary": summary}, f, indent=1)
    for key, s in summary.items():
        print(f"{key} threads: ours {s['ours_vs_corl']['median']:.2f}x CORL, "
              f"bf16 {s['ours_bf16_vs_corl']['median']:.2f}x")


if __name__ == "__main__":
    main(tyro.cli(Cli))
