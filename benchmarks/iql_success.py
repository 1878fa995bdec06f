"""Study 2 diagnosis: why EDIS lowers IQL's training success rate (docs/results.md, study 2).

    python benchmarks/iql_success.py --runs benchmarks/runs/edis/iql      # -> benchmarks/results/iql_success.json

For every finished arm of benchmarks/edis_study.py it reads the final checkpoint and reports
* the online training episodes' success rate before the first EDIS retrain and after it (episode end steps are in
  the checkpoint's progress), and per quarter of the online phase;
* the final policy's success and normalized score over ``--episodes`` episodes acting as in training (a ~ pi(.|s),
  the Gaussian actor's samples) and as in evaluation (its mean), from fresh starts (reset seeds of seed + 777,
  seen neither in training nor in evaluation), the same starts for both modes;
* the actor's standard deviation exp(log_std), per action dimension.
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
import edis_iql as m  # noqa: E402
from utils.common import safe_torch_load  # noqa: E402
from utils.run import reset_seed  # noqa: E402
from utils.tasks import get_task, make_env, normalized_score  # noqa: E402


@dataclasses.dataclass
class Cli:
    runs: str = os.path.join(ROOT, "benchmarks", "runs", "edis", "iql")
    """folder of the IQL runs (seed*/ARM/checkpoint.pt)"""
    episodes: int = 50
    """episodes per policy and mode"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "iql_success.json")
    """where the table goes"""


def rollouts(task, agent, norm, episodes: int, seed: int, stochastic: bool) -> tuple:
    env = make_env(task)
    successes, scores = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=reset_seed(seed + 777, ep))
        done, ret, success = False, 0.0, False
        while not done:
            s = torch.as_tensor((obs - norm["obs_mean"]) / norm["obs_std"], dtype=torch.float32)[None]
            with torch.no_grad():
                a = agent.actor.sample(s) if stochastic else agent.actor.act(s)
            obs, r, terminated, truncated, info = env.step(a[0].numpy())
            ret += float(r)
            success |= bool(info.get("success", False))
            done = terminated or truncated
        successes.append(success)
        scores.append(float(normalized_score(task, ret)))
    env.close()
    return float(np.mean(successes)), float(np.mean(scores))


def main(c: Cli) -> None:
    torch.set_num_threads(1)
    rows = []
    for path in sorted(glob.glob(os.path.join(c.runs, "seed*", "*", "checkpoint.pt"))):
        run_dir = os.path.dirname(path)
        arm, seed = os.path.basename(run_dir), int(os.path.basename(os.path.dirname(run_dir))[4:])
        if arm == "offline" or not os.path.exists(os.path.join(run_dir, "summary.json")):
            continue
        ckpt = safe_torch_load(path, "iql_success")
        args = m.Args(**ckpt["args"])
        task = get_task(args.env)
        norm = {k: v.numpy() if v.dim() else float(v) for k, v in ckpt["normalization"].items()}
        agent = m.Agent(len(norm["obs_mean"]), len(ckpt["agent"]["actor.log_std"]), args.hidden_dim, 1.0,
                        args.actor_dropout)
        agent.load_state_dict(ckpt["agent"])
        agent.eval()
        torch.manual_seed(seed)
        prog = ckpt["progress"]
        t_first = args.offline_steps + args.edis_retrain_every
        steps = np.array([st for st, _ in prog["episode_scores"]])
        succ = np.array(prog["train_successes"], dtype=float)
        quarters = np.linspace(args.offline_steps, args.offline_steps + args.online_steps, 5)
        row = {"seed": seed, "arm": arm, "train_success": float(succ.mean()),
               "train_success_before_first_retrain": float(succ[steps <= t_first].mean()),
               "train_success_after_first_retrain": float(succ[steps > t_first].mean()),
               "train_success_by_quarter": [float(succ[(steps > a) & (steps <= b)].mean())
                                            for a, b in zip(quarters, quarters[1:])],
               "actor_std": ckpt["agent"]["actor.log_std"].clamp(-20, 2).exp().tolist()}
        for mode in ("stochastic", "mean"):
            row[f"final_{mode}_success"], row[f"final_{mode}_score"] = rollouts(
                task, agent, norm, c.episodes, seed, mode == "stochastic")
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(c.out, "w") as f:
        json.dump({"episodes": c.episodes, "runs": rows}, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(Cli))
