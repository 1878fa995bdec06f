"""Study 2 of docs/results.md, diagnosis: Cal-QL's CQL action gap by the source of the rows, at the end of each run.

    python benchmarks/calql_gap.py                  # every Cal-QL run of benchmarks/runs/edis -> results/calql_gap.json

Runs already in results/calql_gap.json that are not under --runs any more (runs/ is not committed) are kept.

The CQL regulariser of Cal-QL (and its Lagrange multiplier alpha', which keeps the batch's mean gap at
its target 0.8) sees a batch-average gap, logsumexp_a Q(s, a) - Q(s, a_data). This script loads each run's
final checkpoint and measures that gap separately on offline rows, online rows and EDIS's synthetic rows (4,096 of
each, uniform, the same offline rows for every run), with the run's critics and actor and calql_update's action sets
(no calibration bound: the online phase's default). It shows whether a rising alpha' comes from what a source's gap
is, or from which sources the batch holds.
"""

import dataclasses
import glob
import json
import os
import sys

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from study_common import machine_info  # noqa: E402

import edis_calql as m  # noqa: E402
from utils.run import CHECKPOINT_FORMAT  # noqa: E402


@dataclasses.dataclass
class Cli:
    runs: str = os.path.join(ROOT, "benchmarks", "runs", "edis", "calql")
    """folder of the Cal-QL runs (seed*/ARM/checkpoint.pt)"""
    rows: int = 4096
    """rows per source"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "calql_gap.json")
    """where the table goes"""


@torch.no_grad()
def action_gap(agent: m.Agent, args: m.Args, rows: dict, generator: torch.Generator) -> dict:
    """Mean over rows and both critics of the clipped CQL gap, and of Q(s, a_data), as calql_update computes them."""
    s, a, s2 = rows["observations"], rows["actions"], rows["next_observations"]
    (n, act_dim), k = a.shape, args.cql_n_actions
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))  # the actor draws from torch's RNG
    a_rand = torch.rand(n, k, act_dim, generator=generator) * 2.0 - 1.0
    a_curr, logp_curr = agent.actor.rsample(s, k)
    a_next, logp_next = agent.actor.rsample(s2, k)
    q = agent.qf.forward_multi(s, torch.cat([a[:, None], a_rand, a_curr, a_next], 1))
    ood = m.cql_logsumexp(q[..., 1:1 + k], q[..., 1 + k:1 + 2 * k], q[..., 1 + 2 * k:], logp_curr, logp_next,
                          act_dim)
    gap = (ood - q[..., 0]).clamp(min=args.cql_clip_diff_min)
    return {"gap": gap.mean().item(), "q_data": q[..., 0].mean().item()}


def read_table(path: str) -> list:
    """The runs of an earlier table at ``path`` ([] if there is none); a file that is not one is a one-line error."""
    if not os.path.exists(path):
        return []
    try:
        runs = json.load(open(path))["runs"]
        assert all({"seed", "arm"} <= set(r) for r in runs)
    except (ValueError, KeyError, TypeError, AssertionError):
        sys.exit(f"error: --out {path} exists and is not a table of this script (no runs with seed and arm); "
                 "move it away or pass another --out")
    return runs


def main(c: Cli) -> None:
    old = read_table(c.out)  # checked first: a wrong --out fails before the measurement
    data, offline_idx, results = None, None, []
    for path in sorted(glob.glob(os.path.join(c.runs, "seed*", "*", "checkpoint.pt"))):
        run_dir = os.path.dirname(path)
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            continue  # still running
        seed, arm = int(os.path.basename(os.path.dirname(run_dir))[4:]), os.path.basename(run_dir)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            sys.exit(f"error: {path} has checkpoint format {ckpt.get('format')}, this script reads "
                     f"{CHECKPOINT_FORMAT}: measure it with the version that wrote it")
        args = m.Args(**ckpt["args"])
        if data is None:
            data = m.load_offline_data(m.get_task(args.env), dataset_path=args.dataset_path)
            offline_idx = np.random.default_rng(0).integers(0, len(data), c.rows)
        norm = {k: v.numpy() if v.dim() else float(v) for k, v in ckpt["normalization"].items()}
        agent = m.Agent(len(norm["obs_mean"]), data.actions.shape[1], args.hidden_dim, 1.0, args.q_layers)
        agent.load_state_dict(ckpt["agent"])
        gen = torch.Generator().manual_seed(seed)
        sources = {"offline": {k: torch.as_tensor(v[offline_idx]) for k, v in (
            ("observations", (data.observations - norm["obs_mean"]) / norm["obs_std"]), ("actions", data.actions),
            ("next_observations", (data.next_observations - norm["obs_mean"]) / norm["obs_std"]))}}
        for name, buf in (("online", ckpt["online_buffer"]), ("synthetic", ckpt["edis"]["synthetic"])):
            if buf is not None and buf["size"]:
                idx = torch.randint(0, buf["size"], (c.rows,), generator=gen)
                sources[name] = {k: buf["data"][k][idx] for k in ("observations", "actions", "next_observations")}
        row = {"seed": seed, "arm": arm, "step": ckpt["step"], "alpha_prime": agent.log_alpha_prime.exp().item(),
               "target_gap": m.TARGET_ACTION_GAP,
               **{name: action_gap(agent, args, rows, gen) for name, rows in sources.items()}}
        print(json.dumps(row), flush=True)
        results.append(row)
    if not results:
        sys.exit(f"error: no finished Cal-QL run (seed*/ARM/checkpoint.pt with summary.json) under {c.runs}")
    # runs/ is not committed: the runs measured before (in the committed table) stay, unless measured again now
    machine = machine_info()
    for row in results:
        row["commit"] = machine["commit"]
    again = {(r["seed"], r["arm"]) for r in results}
    results = [r for r in old if (r["seed"], r["arm"]) not in again] + results
    with open(c.out, "w") as f:
        json.dump({"machine": machine, "command": "python benchmarks/calql_gap.py", "rows": c.rows,
                   "runs": results}, f, indent=1)
    print(f"wrote {c.out}")


if __name__ == "__main__":
    main(tyro.cli(Cli))
