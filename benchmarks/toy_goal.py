"""Study 3a, second toy: a goal-conditioned point mass, where the goal is part of the state and the reward depends on
it. It asks why the paper's guidance raises the reward error, ablating one thing at a time (docs/results.md, 3a).

    python benchmarks/toy_goal.py --seeds 1 2 3        # ~5 min per seed and size on one core

State s = (x, y, gx, gy): position and goal in [-1, 1]^2; action a in [-1, 1]^2; the position moves by 0.15 a (clipped
to the box, stopped by the wall |x| <= 0.1, y <= 0.3), the goal stays; reward r = -||position' - goal||; no terminals.
Offline data: uniform positions, goals and actions. Online data: one fixed goal (0.7, 0.7) from starts near
(-0.7, -0.7), a noisy goal-seeking policy (through the gap above the wall), which is also EDIS's "current policy".

The script's own EDIS functions (edis_iql.py) fit the prior, train the three energies, then sample from the same
initial noise with one change at a time from the paper's form (full gradient on the whole transition, unclipped, at
every noise level, uniform diffusion batches):
  unguided      no guidance (the same prior)
  paper         the paper's form, as edis_retrain runs it by default
  no_reward     the reward dimension left unguided (the official code never guides it)
  no_rd         the reward and terminal dimensions left unguided (what edis_retrain does since this study)
  clip          each sample's guidance clipped to norm sqrt(D) * 10 (the official code's clip, on sigma grad E)
  sigma5        guidance only at sigma <= 5 (energies still trained at every level)
  half_online   half of every diffusion batch online (a new prior and new energies), guidance as the paper
  extras        --edis-extras
Every sample is checked against the true step; the energies' held-out accuracy per noise band is recorded.
Results: benchmarks/results/toy_goal.json.
"""

import dataclasses
import json
import math
import os
import sys

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import edis_iql as m  # noqa: E402

STEP, GOAL, WALL_X, WALL_Y = 0.15, (0.7, 0.7), 0.1, 0.3
GAP = (0.0, 0.65)  # the waypoint above the wall
SIZES = {  # "preset": edis_retrain at the CPU preset (denoiser 256 x 3, lr 3e-4; 2,048 x 10 negatives, 100 InfoNCE
    # steps), but 3,000 denoiser steps; "toy": toy_pointmass.py's sizes (a smaller denoiser trained faster, 500 steps)
    "preset": dict(diffusion_steps=3000, width=256, depth=3, lr=m.DIFFUSION_LR, sample_steps=32, pool=2048,
                   energy_steps=100),
    "toy": dict(diffusion_steps=3000, width=128, depth=2, lr=1e-3, sample_steps=32, pool=512, energy_steps=500),
    # an undertrained prior and energies (a tenth of the denoiser steps, 50 InfoNCE steps on 128 groups)
    "undertrained": dict(diffusion_steps=300, width=128, depth=2, lr=1e-3, sample_steps=32, pool=128,
                         energy_steps=50)}
ARMS = ("unguided", "paper", "no_reward", "no_rd", "clip", "sigma5", "half_online", "extras")


def in_wall(p: torch.Tensor) -> torch.Tensor:
    return (p[:, 0].abs() <= WALL_X) & (p[:, 1] <= WALL_Y)


def step(s: torch.Tensor, a: torch.Tensor) -> tuple:
    """True dynamics: (s', r, terminal)."""
    pos, goal = s[:, :2], s[:, 2:]
    nxt = (pos + STEP * a.clamp(-1, 1)).clamp(-1, 1)
    nxt = torch.where(in_wall(nxt)[:, None], pos, nxt)
    return torch.cat([nxt, goal], 1), -(nxt - goal).norm(dim=1), torch.zeros(len(s))


def policy(s: torch.Tensor, g: torch.Generator, noise: float = 0.3) -> torch.Tensor:
    """Goal seeking: to the gap above the wall while the goal is on the other side of it, then to the goal."""
    pos, goal = s[:, :2], s[:, 2:]
    across = ((pos[:, 0] < -WALL_X) & (goal[:, 0] > WALL_X)) | ((pos[:, 0] > WALL_X) & (goal[:, 0] < -WALL_X))
    target = torch.where(across[:, None], torch.tensor(GAP), goal)
    d = target - pos
    a = d / d.norm(dim=1, keepdim=True).clamp(min=0.15)  # slows down near the target
    return (a + noise * torch.randn(pos.shape, generator=g)).clamp(-1, 1)


def batch(s, a, nxt, r, d) -> dict:
    return {"observations": s, "actions": a, "rewards": r, "next_observations": nxt, "terminals": d}


def uniform_points(n: int, g: torch.Generator) -> torch.Tensor:
    p = torch.rand(3 * n, 2, generator=g) * 2 - 1
    return p[~in_wall(p)][:n]


def offline_data(n: int, g: torch.Generator) -> dict:
    s = torch.cat([uniform_points(n, g), uniform_points(n, g)], 1)
    a = torch.rand(n, 2, generator=g) * 2 - 1
    return batch(s, a, *step(s, a))


def online_data(n: int, g: torch.Generator, horizon: int = 40) -> dict:
    k = n // horizon + 1
    start = lambda: torch.tensor([[-0.7, -0.7]]) + 0.1 * torch.randn(k, 2, generator=g)  # noqa: E731
    s, rows = torch.cat([start(), torch.tensor([GOAL]).expand(k, 2)], 1), []
    for _ in range(horizon):
        a = policy(s, g)
        nxt, r, d = step(s, a)
        rows.append(batch(s, a, nxt, r, d))
        s = nxt
    return {key: torch.cat([b[key] for b in rows])[:n] for key in rows[0]}


def buffer(data: dict) -> m.ReplayBuffer:
    buf = m.ReplayBuffer(4, 2, len(data["observations"]), torch.device("cpu"), extra=m.BUFFER_EXTRA)
    buf.add_batch(data)
    return buf


def measure(x: torch.Tensor, codec: m.TransitionCodec) -> dict:
    b = codec.decode(x)
    s, a = b["observations"], b["actions"].clamp(-1, 1)
    nxt, r, _ = step(s, a)
    return {"dynamics_error": float((b["next_observations"] - nxt).norm(dim=1).mean()),
            "reward_error": float((b["rewards"] - r).abs().mean()),
            "reward_bias": float((b["rewards"] - r).mean()),  # > 0: rewards higher than the step gives
            "terminal_rate": float(b["terminals"].mean()),  # the toy has none
            "states_in_wall": float(in_wall(s[:, :2]).float().mean()),
            "goal_dist_to_online_goal": float((s[:, 2:] - torch.tensor(GOAL)).norm(dim=1).mean()),
            "policy_action_error": float((a - policy(s, torch.Generator().manual_seed(0), 0.0)).norm(dim=1).mean())}


def clipped(guidance, max_norm: float):
    """The official code's per-sample clip, applied to the guidance term sigma grad E of our sampler."""
    def g(x, sigma):
        out = guidance(x, sigma)
        norm = (sigma[:, None] * out).norm(dim=1, keepdim=True).clamp(min=1e-12)
        return out * (max_norm / norm).clamp(max=1.0)
    return g


def fit(seed: int, z: dict, online_frac: float, extras: bool, sigma_max: float) -> tuple:
    """The prior and the energies of one seed, as edis_retrain fits them."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    off, on = buffer(offline_data(20_000, g)), buffer(online_data(3_000, g))
    edis = m.EDISState(m.TransitionCodec(4, 2, torch.device("cpu")))
    c = edis.codec
    x_raw = torch.cat([c.raw(off.rows()), c.raw(on.rows())])
    c.fit(x_raw)
    x_train = (x_raw - c.mean) / c.std
    cond = torch.stack([c.mask(c.s), c.mask(c.s, c.a)])
    denoiser, _ = m.train_diffusion(x_train, z["diffusion_steps"], z["width"], z["depth"], g, cond, on.size,
                                    online_frac, lr=z["lr"])
    m.build_energies(edis, extras, position_dims=(0, 1))
    metrics = m.fit_energies(edis, denoiser, on, lambda o: policy(o, g), x_train, g, sample_steps=z["sample_steps"],
                             pool=z["pool"], negatives=10, steps=z["energy_steps"], online_frac=online_frac,
                             sigma_max=sigma_max)
    return denoiser, edis, {k: float(v) for k, v in metrics.items()}


def run(seed: int, sizes: str = "preset", arms: tuple = ARMS, n_eval: int = 4000, **overrides) -> dict:
    z = {**SIZES[sizes], **overrides}
    fits = {}
    out = {"seed": seed, "sizes": sizes, "arms": {}, "energy_metrics": {}}
    for arm in arms:
        key = {"half_online": "half_online", "extras": "extras"}.get(arm, "paper")
        if key not in fits:
            frac, extras, smax = {"paper": (0.0, False, m.SIGMA_MAX), "half_online": (0.5, False, m.SIGMA_MAX),
                                  "extras": (m.EXTRAS["online_frac"], True, m.EXTRAS["guide_sigma_max"])}[key]
            fits[key] = fit(seed, z, frac, extras, smax) + (smax,)
            out["energy_metrics"][key] = fits[key][2]
        denoiser, edis, _, smax = fits[key]
        c = edis.codec
        dims = {"no_reward": 1.0 - c.mask(c.r), "no_rd": 1.0 - c.mask(c.r, c.d)}.get(arm)  # None: every dimension
        guide = m.make_guidance(edis.energies, {}, dims=dims)
        if arm == "clip":
            guide = clipped(guide, math.sqrt(c.dim) * 10.0)
        if arm == "sigma5":
            smax = 5.0
        noise = torch.Generator().manual_seed(seed + 123)  # the same initial noise for every arm
        x = m.sample_chunked(denoiser, n_eval, c.dim, z["sample_steps"], noise,
                             guidance=None if arm == "unguided" else guide, guide_sigma_max=smax)
        out["arms"][arm] = measure(x.detach(), c)
    return out


@dataclasses.dataclass
class Cli:
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of the toy (data, networks, sampling)"""
    sizes: tuple[str, ...] = ("preset", "toy", "undertrained")
    """which sizes of SIZES to run"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "toy_goal.json")
    """where the results go (seeds already there are skipped)"""


def main(cli: Cli) -> None:
    torch.set_num_threads(1)
    results = json.load(open(cli.out)) if os.path.exists(cli.out) else []
    for sizes, seed in [(z, s) for z in cli.sizes for s in cli.seeds]:
        if any(r["seed"] == seed and r.get("sizes", "toy") == sizes for r in results):
            continue
        r = run(seed, sizes)
        results.append(r)
        for arm, v in r["arms"].items():
            print(f"{sizes} seed {seed} {arm:>12}: dyn {v['dynamics_error']:.4f} rew {v['reward_error']:.4f} "
                  f"(bias {v['reward_bias']:+.3f}) wall {v['states_in_wall']:.3f} "
                  f"goal {v['goal_dist_to_online_goal']:.2f} pi {v['policy_action_error']:.3f}", flush=True)
        tmp = cli.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(sorted(results, key=lambda r: (r.get("sizes", "toy"), r["seed"])), f, indent=1)
        os.replace(tmp, cli.out)


if __name__ == "__main__":
    main(tyro.cli(Cli))
