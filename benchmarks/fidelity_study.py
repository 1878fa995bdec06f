"""Study 3 of docs/results.md: how physically correct are EDIS's synthetic transitions, and how close are their states
to the online state distribution? Unguided diffusion vs EDIS guidance vs real data, on PointMaze.

    python benchmarks/fidelity_study.py --algo iql --seeds 1 2 3     # needs benchmarks/edis_study.py's EDIS runs

For each seed it loads the final checkpoint of the EDIS arm of the EDIS study (agent, online replay, energies,
normalisation), rebuilds the offline buffer, and does what the script's next EDIS retrain would do: fit a fresh
denoiser on offline + online data and continue the three energies' InfoNCE training. Then it draws ``--samples``
transitions twice from the same initial noise: without guidance and with the script's guidance weights.

Measured for each set (and for real offline / online transitions, which check the measurement itself):

* dynamics error: reset the MuJoCo point to the generated state (qpos = x, y; qvel = vx, vy), apply the generated
  action through the env's own step (action clip, velocity clip, frame skip), and compare the generated next
  (x, y, vx, vy) with the simulated one (L2, raw units); the goal part of s' is compared with the goal of s;
* reward error: generated reward vs the sparse reward recomputed from the generated s' (|x,y - goal| <= 0.45);
* states inside walls: generated (x, y) whose maze cell is a wall;
* closeness to the online states: MMD^2 (Gaussian kernel, median-distance bandwidth of the online states) between the
  set's states and a sample of online states, in normalised state space; also the mean distance from each state to
  its nearest online state. Reference values: offline states, and a second disjoint sample of online states.
* generation speed: transitions per second with and without guidance (one core unless --threads).

Writes ``<out>/seed<k>.json``; ``benchmarks/make_results.py`` turns them into a table.
"""

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from study_common import machine_info  # noqa: E402


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 with k(u, v) = exp(-|u - v|^2 / (2 h^2))."""
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth ** 2))  # noqa: E731
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                 - 2 * k(x, y).mean())


def simulate(env, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Next (x, y, vx, vy) from the PointMaze simulator after resetting it to each flat state [x, y, vx, vy, gx, gy]."""
    point = env.unwrapped.point_env
    out = np.empty((len(obs), 4), np.float64)
    for i, (s, a) in enumerate(zip(obs.astype(np.float64), actions.astype(np.float64))):
        point.set_state(s[:2].copy(), s[2:4].copy())
        out[i] = point.step(a)[0]
    return out


def wall_fraction(env, xy: np.ndarray) -> float:
    """Fraction of positions whose maze cell is a wall (cell size = maze_size_scaling, origin at the maze centre)."""
    maze = env.unwrapped.maze
    rows, cols = len(maze.maze_map), len(maze.maze_map[0])
    col = np.floor((xy[:, 0] + maze.x_map_center) / maze.maze_size_scaling).astype(int)
    row = np.floor((maze.y_map_center - xy[:, 1]) / maze.maze_size_scaling).astype(int)
    outside = (row < 0) | (row >= rows) | (col < 0) | (col >= cols)
    grid = np.array(maze.maze_map, dtype=object)
    inside = ~outside
    wall = np.zeros(len(xy), bool)
    wall[inside] = grid[row[inside], col[inside]] == 1
    return float((wall | outside).mean())


def measure(name: str, raw: dict, env, online_ref: torch.Tensor, norm_state, bandwidth: float) -> dict:
    obs, act = raw["observations"], raw["actions"]
    nxt, rew = raw["next_observations"], raw["rewards"]
    sim = simulate(env, obs, act)
    dyn = np.linalg.norm(nxt[:, :4] - sim, axis=1)
    pos = np.linalg.norm(nxt[:, :2] - sim[:, :2], axis=1)
    goal_jump = np.linalg.norm(nxt[:, 4:6] - obs[:, 4:6], axis=1)
    r_true = (np.linalg.norm(nxt[:, :2] - obs[:, 4:6], axis=1) <= 0.45).astype(np.float64)
    s = norm_state(obs)
    nn_dist = torch.cdist(s, online_ref).min(1).values
    return {"set": name, "n": len(obs), "dynamics_error_mean": float(dyn.mean()),
            "dynamics_error_median": float(np.median(dyn)), "position_error_mean": float(pos.mean()),
            "step_size_mean": float(np.linalg.norm(nxt[:, :4] - obs[:, :4], axis=1).mean()),
            "goal_change_mean": float(goal_jump.mean()), "reward_error_mean": float(np.abs(rew - r_true).mean()),
            "states_in_walls": wall_fraction(env, obs[:, :2]), "next_states_in_walls": wall_fraction(env, nxt[:, :2]),
            "mmd2_to_online": mmd2(s, online_ref, bandwidth), "nn_dist_to_online": float(nn_dist.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", choices=["iql", "calql"], default="iql")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--runs", default=os.path.join(ROOT, "benchmarks", "runs", "edis"),
                   help="output folder of benchmarks/edis_study.py")
    p.add_argument("--samples", type=int, default=4000, help="generated transitions per set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "runs", "fidelity"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    mod = importlib.import_module(f"edis_{a.algo}")
    for seed in a.seeds:
        ckpt_path = os.path.join(a.runs, a.algo, f"seed{seed}", "edis", mod.CHECKPOINT)
        if not os.path.exists(ckpt_path):
            sys.exit(f"error: no checkpoint at {ckpt_path}; run benchmarks/edis_study.py --seeds {seed} first")
        t0 = time.time()
        ckpt = mod.safe_torch_load(ckpt_path, "fidelity study")  # never executes code from the file
        args = mod.Args(**ckpt["args"])
        task = mod.get_task(args.env)
        device = torch.device("cpu")
        mod.seed_everything(seed, False)
        gen = torch.Generator().manual_seed(seed)
        norm = {k: v.numpy() if v.dim() else float(v) for k, v in ckpt["normalization"].items()}
        mean, std = torch.as_tensor(norm["obs_mean"]), torch.as_tensor(norm["obs_std"])
        data = mod.load_offline_data(task, dataset_path=args.dataset_path)
        obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
        rewards = data.rewards * norm["reward_scale"] + norm["reward_bias"]
        offline = mod.ReplayBuffer(obs_dim, act_dim, len(data), device, extra=mod.BUFFER_EXTRA)
        offline.add_batch({"observations": (data.observations - norm["obs_mean"]) / norm["obs_std"],
                           "actions": data.actions, "rewards": rewards,
                           "next_observations": (data.next_observations - norm["obs_mean"]) / norm["obs_std"],
                           "terminals": data.terminals, **mod.offline_extras(data, rewards, args)})
        online = mod.ReplayBuffer(obs_dim, act_dim, ckpt["online_buffer"]["size"], device, extra=mod.BUFFER_EXTRA)
        online.load_state_dict(ckpt["online_buffer"])
        env = mod.make_env(task, seed=seed)
        agent = mod.Agent(obs_dim, act_dim, args, float(env.action_space.high[0]))
        agent.load_state_dict(ckpt["agent"])
        edis = mod.new_edis_state(obs_dim, act_dim, args, device)
        edis.energies.load_state_dict(ckpt["edis"]["energies"])
        edis.energy_opt.load_state_dict(ckpt["edis"]["energy_opt"])

        # what the next EDIS retrain would do (edis_retrain), keeping the denoiser to sample with and without guidance
        codec = edis.codec
        x_raw = torch.cat([codec.raw(offline.rows()), codec.raw(online.rows())])
        codec.fit(x_raw)
        denoiser, _ = mod.train_diffusion((x_raw - codec.mean) / codec.std, args, gen)
        energy_metrics = mod.train_energies(edis, denoiser, online, lambda o: agent.actor.sample(o), args, gen)
        weights = {"state": args.guide_state, "policy": args.guide_policy, "transition": args.guide_transition}
        guidance = mod.make_guidance(edis.energies, codec, weights)
        sets, speed = {}, {}
        for name, g in (("unguided", None), ("edis", guidance)):
            noise = torch.Generator().manual_seed(seed + 123)  # the same initial noise for both sets
            t1 = time.time()
            x = mod.sample_chunked(denoiser, a.samples, codec.dim, args, noise, guidance=g)
            speed[name] = a.samples / (time.time() - t1)
            sets[name] = codec.decode(x.detach())
            sets[name]["actions"] = sets[name]["actions"].clamp(-1.0, 1.0)  # as edis_retrain stores them

        def to_raw(batch: dict) -> dict:  # normalised buffer rows -> env units
            return {"observations": (batch["observations"] * std + mean).numpy(),
                    "actions": batch["actions"].numpy(),
                    "rewards": ((batch["rewards"] - norm["reward_bias"]) / norm["reward_scale"]).numpy(),
                    "next_observations": (batch["next_observations"] * std + mean).numpy()}

        n_on = online.size
        perm = torch.randperm(n_on, generator=gen)
        ref_idx, held_idx = perm[: n_on // 2][: a.samples], perm[n_on // 2:][: a.samples]
        online_rows = online.rows()
        online_ref = online_rows["observations"][ref_idx]
        bandwidth = float(torch.cdist(online_ref, online_ref).median())
        norm_state = lambda o: (torch.as_tensor(o, dtype=torch.float32) - mean) / std  # noqa: E731
        off_idx = torch.randint(0, offline.size, (a.samples,), generator=gen)
        real = {"offline (real)": {k: v[off_idx] for k, v in offline.rows().items()},
                "online (real, held out)": {k: v[held_idx] for k, v in online_rows.items()}}
        rows = [measure(name, to_raw(b), env, online_ref, norm_state, bandwidth) for name, b in
                {**real, "unguided diffusion": sets["unguided"], "EDIS guided": sets["edis"]}.items()]
        result = {"algo": a.algo, "seed": seed, "checkpoint": os.path.relpath(ckpt_path, ROOT),
                  "online_transitions": n_on, "samples": a.samples, "guidance_weights": weights,
                  "sample_steps": args.edis_sample_steps, "samples_per_s": speed,
                  "energy_acc": {k: float(v) for k, v in energy_metrics.items() if "acc" in k},
                  "rows": rows, "wall_s": round(time.time() - t0, 1), **machine_info()}
        with open(os.path.join(a.out, f"{a.algo}_seed{seed}.json"), "w") as f:
            json.dump(result, f, indent=2)
        for r in rows:
            print(f"seed {seed} {r['set']:>24}: dyn err {r['dynamics_error_mean']:.4f}  "
                  f"walls {r['states_in_walls']:.3f}"
                  f"  MMD2 {r['mmd2_to_online']:.4f}  NN {r['nn_dist_to_online']:.3f}", flush=True)
        print(f"seed {seed}: samples/s {speed}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
