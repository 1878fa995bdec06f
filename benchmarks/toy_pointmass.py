"""A 2-D point mass with a wall and a goal: a toy with known dynamics on which EDIS guidance can be checked exactly.

    python benchmarks/toy_pointmass.py --seeds 1 2 3        # ~2 min per seed and form on one core

State s = (x, y) in [-1, 1]^2, action a in [-1, 1]^2, s' = clip(s + 0.15 a) unless s' would be inside the wall
(x in [-0.1, 0.1], y <= 0.3), then s' = s; reward and terminal 1 when s' is within 0.2 of the goal (0.7, 0.7).
Offline data: uniform states and uniform actions. Online data: a noisy waypoint policy from (-0.7, -0.7) through the
gap above the wall to the goal, the "current policy" of EDIS. The script's own EDIS functions (edis_iql.py) fit the
diffusion prior on offline + online data, train the energies, and sample with and without guidance, in the paper's
form and with --edis-extras; every sample is checked against the true step function.
Results: benchmarks/results/toy_guidance.json (docs/results.md, study 3).
tests/test_edis_iql.py runs the same toy at a smaller size.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import edis_iql as m  # noqa: E402
from utils.run import bf16_autocast  # noqa: E402

STEP, GOAL, GOAL_RADIUS = 0.15, (0.7, 0.7), 0.2
WALL_X, WALL_Y = 0.1, 0.3  # the wall: |x| <= WALL_X and y <= WALL_Y


def in_wall(s: torch.Tensor) -> torch.Tensor:
    return (s[:, 0].abs() <= WALL_X) & (s[:, 1] <= WALL_Y)


def step(s: torch.Tensor, a: torch.Tensor) -> tuple:
    """True dynamics: (s', r, terminal)."""
    nxt = (s + STEP * a.clamp(-1, 1)).clamp(-1, 1)
    nxt = torch.where(in_wall(nxt)[:, None], s, nxt)
    r = ((nxt - torch.tensor(GOAL)).norm(dim=1) <= GOAL_RADIUS).float()
    return nxt, r, r.clone()


def policy(s: torch.Tensor, g: torch.Generator, noise: float = 0.3) -> torch.Tensor:
    """Waypoint policy: to the gap above the wall while left of it, then to the goal; Gaussian action noise."""
    waypoint = torch.where((s[:, 0] < -WALL_X)[:, None], torch.tensor([0.0, 0.65]), torch.tensor(GOAL))
    d = waypoint - s
    a = d / d.norm(dim=1, keepdim=True).clamp(min=1e-6)
    return (a + noise * torch.randn(s.shape, generator=g)).clamp(-1, 1)


def batch(s, a, nxt, r, d) -> dict:
    return {"observations": s, "actions": a, "rewards": r, "next_observations": nxt, "terminals": d}


def offline_data(n: int, g: torch.Generator) -> dict:
    s = torch.rand(3 * n, 2, generator=g) * 2 - 1
    s = s[~in_wall(s)][:n]
    a = torch.rand(n, 2, generator=g) * 2 - 1
    return batch(s, a, *step(s, a))


def online_data(n: int, g: torch.Generator, horizon: int = 40) -> dict:
    rows, s = [], torch.tensor([[-0.7, -0.7]]) + 0.1 * torch.randn(n // horizon + 1, 2, generator=g)
    for _ in range(horizon):
        a = policy(s, g)
        nxt, r, d = step(s, a)
        rows.append(batch(s, a, nxt, r, d))
        s = torch.where(d.bool()[:, None], torch.tensor([[-0.7, -0.7]]), nxt)  # restart at the start after the goal
    out = {k: torch.cat([b[k] for b in rows])[:n] for k in rows[0]}
    return out


def buffer(data: dict) -> m.ReplayBuffer:
    n = len(data["observations"])
    buf = m.ReplayBuffer(2, 2, n, torch.device("cpu"), extra=m.BUFFER_EXTRA)
    buf.add_batch(data)
    return buf


TOY = dict(diffusion_steps=3000, width=128, depth=2, lr=1e-3, sample_steps=32, pool=512, energy_steps=500)


def measure(x: torch.Tensor, codec: m.TransitionCodec, online_states: torch.Tensor) -> dict:
    b = codec.decode(x)
    s, a = b["observations"], b["actions"].clamp(-1, 1)
    nxt, r, _ = step(s, a)
    d = torch.cdist(s, online_states).min(1).values
    return {"dynamics_error": float((b["next_observations"] - nxt).norm(dim=1).mean()),
            "reward_error": float((b["rewards"] - r).abs().mean()),
            "states_in_wall": float(in_wall(s).float().mean()),
            "next_states_in_wall": float(in_wall(b["next_observations"]).float().mean()),
            "nn_dist_to_online": float(d.mean()),
            "policy_action_error": float((a - policy(s, torch.Generator().manual_seed(0), 0.0)).norm(dim=1).mean())}


def run(seed: int, extras: bool, n_eval: int = 2000, **sizes) -> dict:
    """EDIS as edis_retrain runs it (the paper's form, or with --edis-extras): fit the prior, train the energies,
    then sample unguided and guided from the same noise."""
    z = {**TOY, **sizes}
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    off, on = buffer(offline_data(20_000, g)), buffer(online_data(3_000, g))
    held_out = online_data(2_000, torch.Generator().manual_seed(seed + 1000))  # never in a training pool
    edis = m.EDISState(m.TransitionCodec(2, 2, torch.device("cpu")))
    codec = edis.codec
    x_raw = torch.cat([codec.raw(off.rows()), codec.raw(on.rows())])
    codec.fit(x_raw)
    online_frac, sigma_max = (m.EXTRAS["online_frac"], m.EXTRAS["guide_sigma_max"]) if extras else (0.0, m.SIGMA_MAX)
    t0 = time.time()
    x_train = (x_raw - codec.mean) / codec.std
    cond = torch.stack([codec.mask(codec.s), codec.mask(codec.s, codec.a)])
    denoiser, _ = m.train_diffusion(x_train, z["diffusion_steps"], z["width"], z["depth"], g, cond, on.size,
                                    online_frac, lr=z["lr"])
    t1 = time.time()
    m.build_energies(edis, extras, position_dims=(0, 1))  # the toy's state is the position (x, y)
    metrics = m.fit_energies(edis, denoiser, on, lambda o: policy(o, g), x_train, g, sample_steps=z["sample_steps"],
                             pool=z["pool"], negatives=10, steps=z["energy_steps"], online_frac=online_frac,
                             sigma_max=sigma_max)
    t2 = time.time()
    out = {"seed": seed, "extras": extras, "diffusion_s": t1 - t0, "energies_s": t2 - t1,
           "energy_metrics": {k: float(v) for k, v in metrics.items()}}
    with torch.no_grad():  # conditional sampler check: (r, s', d) given real held-out (s, a)
        x_held = codec.encode(held_out)[:n_eval]
        x_cond = m.sample_chunked(denoiser, len(x_held), codec.dim, z["sample_steps"], g, known=x_held,
                                  known_mask=codec.mask(codec.s, codec.a))
    online_states = held_out["observations"]
    out["conditional_given_sa"] = measure(x_cond, codec, online_states)
    out["online_real"] = measure(x_held, codec, online_states[n_eval // 2:])
    guidance = m.make_guidance(edis.energies, {}, m.guided_dims(codec, extras))
    for name, guide in (("unguided", None), ("guided", guidance)):
        noise = torch.Generator().manual_seed(seed + 123)  # the same initial noise for both
        x = m.sample_chunked(denoiser, n_eval, codec.dim, z["sample_steps"], noise, guidance=guide,
                             guide_sigma_max=sigma_max)  # as edis_retrain
        out[name] = measure(x.detach(), codec, online_states)
    return out


@dataclasses.dataclass
class Cli:
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of the toy (data, networks, sampling)"""
    out: Optional[str] = None
    """where the results go (default benchmarks/results/toy_guidance.json, or toy_guidance_bf16.json with --bf16)"""
    bf16: bool = False
    """everything under bf16 autocast, fp32 weights, as the scripts' --bf16 (the precision check of the speed issue)"""


def main(cli: Cli) -> None:
    torch.set_num_threads(1)
    if cli.bf16:
        bf16_autocast(torch.device("cpu"), True).__enter__()
    cli.out = cli.out or os.path.join(ROOT, "benchmarks", "results", f"toy_guidance{'_bf16' if cli.bf16 else ''}.json")
    results = []
    for extras in (False, True):
        for seed in cli.seeds:
            r = run(seed, extras)
            results.append(r)
            u, gd = r["unguided"], r["guided"]
            print(f"{'extras' if extras else 'paper':>6} seed {seed}: dyn {u['dynamics_error']:.4f} -> "
                  f"{gd['dynamics_error']:.4f}  wall {u['states_in_wall']:.3f} -> {gd['states_in_wall']:.3f}  "
                  f"NN {u['nn_dist_to_online']:.3f} -> {gd['nn_dist_to_online']:.3f}  "
                  f"pi-err {u['policy_action_error']:.3f} -> {gd['policy_action_error']:.3f}  "
                  f"cond dyn {r['conditional_given_sa']['dynamics_error']:.4f}", flush=True)
    os.makedirs(os.path.dirname(cli.out), exist_ok=True)
    with open(cli.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(Cli))
