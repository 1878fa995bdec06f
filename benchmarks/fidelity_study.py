"""Study 3 of docs/results.md: how physically correct are EDIS's synthetic transitions, how close are their states to
the online state distribution and their actions to the current policy? Unguided diffusion vs guided samples of the
paper's EDIS and of --edis-extras vs real data, on PointMaze.

    python benchmarks/fidelity_study.py --algo iql --seeds 1 2 3     # needs benchmarks/edis_study.py's runs

For each seed it loads the final checkpoint of one arm of the EDIS study (default: plain fine-tuning, so the buffer
does not depend on any EDIS design): the agent (the "current policy"), the online replay and the normalisation. It
rebuilds the offline buffer and keeps ``--held-out`` online transitions out of every training pool. Then, for the
paper's form and the extras, it does what the script's EDIS retrain does (fresh denoiser on offline + online data,
fresh energies trained for ``--energy-steps`` InfoNCE steps) and draws ``--samples`` transitions from the same
initial noise without and with guidance. The conditional sampler is checked on its own: (r, s', d) generated given
real held-out (s, a).

Measured for each set (and for real offline / held-out online transitions, which check the measurement itself):

* dynamics error: reset the MuJoCo point to the generated state (qpos = x, y; qvel = vx, vy), apply the generated
  action through the env's own step (action clip, velocity clip, frame skip), and compare the generated next
  (x, y, vx, vy) with the simulated one (L2, raw units); the goal part of s' is compared with the goal of s;
* reward error: generated reward vs the sparse reward recomputed from the generated s' (|x,y - goal| <= 0.45);
* states inside walls: generated (x, y) whose maze cell is a wall; states overlapping walls: (x, y) closer to a
  wall than the ball's radius (impossible states, where the simulator pushes the ball out), states touching walls
  (ball within 0.05 of a wall, or overlapping it: where PointMaze's online data concentrate), and the dynamics
  error of the transitions whose s and s' are both clear of the walls;
* closeness to the online states: MMD^2 (Gaussian kernel, median-distance bandwidth of the online states) between the
  set's states and half of the held-out online states, in normalised state space; also the mean distance from each
  state to its nearest online state. The other half of the held-out states gives the noise floor;
* closeness to the current policy: mean ||a - mean action of pi(s)|| over the set's (s, a);
* generation speed: transitions per second of each set (one core unless --threads).

Writes ``<out>/<algo>_seed<k>.json``; ``benchmarks/make_results.py`` turns them into a table.
"""

import dataclasses
import importlib
import json
import os
import sys
import time

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from study_common import machine_info  # noqa: E402

from utils.common import safe_torch_load, seed_everything  # noqa: E402


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
    return float(in_walls(env, xy).mean())


def in_walls(env, xy: np.ndarray) -> np.ndarray:
    """Whether each position's maze cell is a wall (outside the maze counts as wall)."""
    maze = env.unwrapped.maze
    rows, cols = len(maze.maze_map), len(maze.maze_map[0])
    col = np.floor((xy[:, 0] + maze.x_map_center) / maze.maze_size_scaling).astype(int)
    row = np.floor((maze.y_map_center - xy[:, 1]) / maze.maze_size_scaling).astype(int)
    outside = (row < 0) | (row >= rows) | (col < 0) | (col >= cols)
    grid = np.array(maze.maze_map, dtype=object)
    inside = ~outside
    wall = np.zeros(len(xy), bool)
    wall[inside] = grid[row[inside], col[inside]] == 1
    return wall | outside


TOUCH_MARGIN = 0.05  # a ball within this distance of a wall (or overlapping it) counts as touching it


def wall_distance(env, xy: np.ndarray) -> np.ndarray:
    """Distance from each position to the nearest wall block (0 inside a wall or outside the maze)."""
    maze = env.unwrapped.maze
    centres = np.array([maze.cell_rowcol_to_xy(np.array([r, c])) for r, row in enumerate(maze.maze_map)
                        for c, v in enumerate(row) if v == 1])
    gap = np.abs(xy[:, None, :] - centres[None]) - maze.maze_size_scaling / 2  # per axis, beyond each block's face
    return np.where(in_walls(env, xy), 0.0, np.linalg.norm(np.maximum(gap, 0.0), axis=-1).min(1))


def ball_radius(env) -> float:
    """Radius of the PointMaze ball (its MuJoCo geom): a centre closer than this to a wall is an impossible state."""
    import mujoco

    model = env.unwrapped.point_env.model
    return float(model.geom_size[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "particle_geom")][0])


def measure(name: str, raw: dict, env, online_ref: torch.Tensor, norm_state, bandwidth: float, policy_mean) -> dict:
    obs, act = raw["observations"], raw["actions"]
    nxt, rew = raw["next_observations"], raw["rewards"]
    sim = simulate(env, obs, act)
    dyn = np.linalg.norm(nxt[:, :4] - sim, axis=1)
    pos = np.linalg.norm(nxt[:, :2] - sim[:, :2], axis=1)
    goal_jump = np.linalg.norm(nxt[:, 4:6] - obs[:, 4:6], axis=1)
    r_true = (np.linalg.norm(nxt[:, :2] - obs[:, 4:6], axis=1) <= 0.45).astype(np.float64)
    s = norm_state(obs)
    nn_dist = torch.cdist(s, online_ref).min(1).values
    free = ~(in_walls(env, obs[:, :2]) | in_walls(env, nxt[:, :2]))
    radius = ball_radius(env)  # states whose ball overlaps a wall: the simulator pushes it out, a large "error"
    wall_dist = wall_distance(env, obs[:, :2])
    overlap = wall_dist < radius
    clear = ~overlap & (wall_distance(env, nxt[:, :2]) >= radius)
    return {"set": name, "n": len(obs), "dynamics_error_mean": float(dyn.mean()),
            "dynamics_error_median": float(np.median(dyn)),
            "dynamics_error_free_mean": float(dyn[free].mean()) if free.any() else None,
            "dynamics_error_clear_mean": float(dyn[clear].mean()) if clear.any() else None,
            "states_overlapping_walls": float(overlap.mean()),
            "states_touching_walls": float((wall_dist < radius + TOUCH_MARGIN).mean()),
            "position_error_mean": float(pos.mean()),
            "step_size_mean": float(np.linalg.norm(nxt[:, :4] - obs[:, :4], axis=1).mean()),
            "goal_change_mean": float(goal_jump.mean()), "reward_error_mean": float(np.abs(rew - r_true).mean()),
            "states_in_walls": wall_fraction(env, obs[:, :2]), "next_states_in_walls": wall_fraction(env, nxt[:, :2]),
            "mmd2_to_online": mmd2(s, online_ref, bandwidth), "nn_dist_to_online": float(nn_dist.mean()),
            "policy_action_dist": float(np.linalg.norm(act - policy_mean(obs), axis=1).mean())}


@dataclasses.dataclass
class Cli:
    algo: str = "iql"
    """which script's checkpoints and EDIS functions (iql or calql)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of benchmarks/edis_study.py whose checkpoints are used"""
    arm: str = "noedis"
    """which arm's final checkpoint gives the online buffer and the current policy (noedis: independent of EDIS)"""
    forms: tuple[str, ...] = ("paper", "extras")
    """EDIS as the paper writes it, and with --edis-extras"""
    energy_steps: int = 400
    """InfoNCE steps of the (fresh) energies: a run's energies persist over its retrains, 4 x 100 at the CPU preset"""
    runs: str = os.path.join(ROOT, "benchmarks", "runs", "edis")
    """output folder of benchmarks/edis_study.py"""
    samples: int = 4000
    """generated transitions per set"""
    held_out: int = 2000
    """online transitions kept out of every training pool (diffusion, energies) and used as the reference"""
    overrides: tuple[str, ...] = ()
    """more script flags for every set, as name=value (e.g. edis_diffusion_steps=10000 edis_sample_steps=64)"""
    threads: int = 1
    """torch threads"""
    out: str = os.path.join(ROOT, "benchmarks", "runs", "fidelity")
    """where the per-seed JSON files go"""


def main(a: Cli) -> None:
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    mod = importlib.import_module(f"edis_{a.algo}")
    for seed in a.seeds:
        ckpt_path = os.path.join(a.runs, a.algo, f"seed{seed}", a.arm, "checkpoint.pt")
        if not os.path.exists(ckpt_path):
            sys.exit(f"error: no checkpoint at {ckpt_path}; run benchmarks/edis_study.py --seeds {seed} first")
        t0 = time.time()
        ckpt = safe_torch_load(ckpt_path, "fidelity study")  # never executes code from the file
        args = mod.Args(**ckpt["args"])
        for item in a.overrides:
            name, _, value = item.partition("=")
            old = getattr(args, name, None)
            if not isinstance(old, (bool, int, float, str)):
                sys.exit(f"error: --overrides {item}: not a number, text or true/false flag of the script")
            try:
                setattr(args, name, value.lower() == "true" if isinstance(old, bool) else type(old)(value))
            except ValueError:
                sys.exit(f"error: --overrides {item}: {value!r} is not a {type(old).__name__}")
        task = mod.get_task(args.env)
        device = torch.device("cpu")
        seed_everything(seed, False)
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
                           "terminals": data.terminals})  # EDIS models (s, a, r, s', d) only: no extras
        full = mod.ReplayBuffer(obs_dim, act_dim, ckpt["online_buffer"]["size"], device, extra=mod.BUFFER_EXTRA)
        full.load_state_dict(ckpt["online_buffer"])
        # the held-out online transitions never enter a training pool: split once, train on the rest
        perm = torch.randperm(full.size, generator=gen)
        n_held = min(a.held_out, full.size // 2)
        rows_of = lambda idx: {k: v[idx] for k, v in full.data.items()}  # noqa: E731
        held_rows = rows_of(perm[:n_held])
        online = mod.ReplayBuffer(obs_dim, act_dim, full.size - n_held, device, extra=mod.BUFFER_EXTRA)
        online.add_batch(rows_of(perm[n_held:]))
        env = mod.make_env(task, seed=seed)
        agent = mod.Agent(obs_dim, act_dim, args.hidden_dim, float(env.action_space.high[0]),
                          *((args.actor_dropout,) if a.algo == "iql" else (args.q_layers,)))
        agent.load_state_dict(ckpt["agent"])  # only the actor is used (the "current policy")

        def to_raw(batch: dict) -> dict:  # normalised buffer rows -> env units
            return {"observations": (batch["observations"] * std + mean).numpy(),
                    "actions": batch["actions"].clamp(-1.0, 1.0).numpy(),  # as edis_retrain stores them
                    "rewards": ((batch["rewards"] - norm["reward_bias"]) / norm["reward_scale"]).numpy(),
                    "next_observations": (batch["next_observations"] * std + mean).numpy()}

        half = n_held // 2  # the held-out set: one half is the reference states, the other a real-data row
        online_ref = held_rows["observations"][:half]
        bandwidth = float(torch.cdist(online_ref, online_ref).median())
        norm_state = lambda o: (torch.as_tensor(o, dtype=torch.float32) - mean) / std  # noqa: E731
        agent.eval()  # the deterministic evaluation action of the current policy (no dropout)
        policy_mean = lambda s: agent.actor.act(norm_state(s)).detach().clamp(-1, 1).numpy()  # noqa: E731
        off_idx = torch.randint(0, offline.size, (a.samples,), generator=gen)
        off_rows = {k: v[off_idx] for k, v in offline.data.items()}
        rows = [measure("offline (real)", to_raw(off_rows), env, online_ref, norm_state, bandwidth,
                        policy_mean),
                measure("online (real, held out)", to_raw({k: v[half:] for k, v in held_rows.items()}), env,
                        online_ref, norm_state, bandwidth, policy_mean)]
        speed, energy_acc, timing = {}, {}, {}
        for form in a.forms:
            extras = form == "extras"
            online_frac, sigma_max = (mod.EXTRAS["online_frac"], mod.EXTRAS["guide_sigma_max"]) if extras else (
                0.0, mod.SIGMA_MAX)
            edis = mod.EDISState(mod.TransitionCodec(obs_dim, act_dim, device))
            codec = edis.codec
            x_raw = torch.cat([codec.raw(offline.rows()), codec.raw(online.rows())])
            codec.fit(x_raw)
            cond = torch.stack([codec.mask(codec.s), codec.mask(codec.s, codec.a)])
            t1 = time.time()
            x_train = (x_raw - codec.mean) / codec.std
            denoiser, _ = mod.train_diffusion(x_train, args.edis_diffusion_steps, args.edis_width, args.edis_depth,
                                              gen, cond, online.size, online_frac)
            diffusion_s = time.time() - t1
            x_held = codec.encode(held_rows)[: a.samples]  # the conditional sampler: (r, s', d) given real (s, a)
            with torch.no_grad():
                x = mod.sample_chunked(denoiser, len(x_held), codec.dim, args.edis_sample_steps, gen, known=x_held,
                                       known_mask=codec.mask(codec.s, codec.a))
            rows.append(measure(f"{form}: (r, s', d) given real (s, a), conditional sampler",
                                to_raw(codec.decode(x)), env, online_ref, norm_state, bandwidth, policy_mean))
            mod.build_energies(edis, extras, task.position_dims)
            t2 = time.time()
            metrics = mod.fit_energies(edis, denoiser, online, agent.actor.sample, x_train, gen,
                                       sample_steps=args.edis_sample_steps, pool=args.energy_pool,
                                       negatives=args.energy_negatives, steps=a.energy_steps,
                                       online_frac=online_frac, sigma_max=sigma_max)
            timing[form] = {"diffusion_s": diffusion_s, "energies_s": time.time() - t2}
            energy_acc[form] = {k: float(v) for k, v in metrics.items() if "acc" in k}
            guided = mod.make_guidance(edis.energies, {}, mod.guided_dims(codec, extras))  # as edis_retrain
            for name, guidance in (("unguided", None), ("guided", guided)):
                noise = torch.Generator().manual_seed(seed + 123)  # the same initial noise for every set
                t3 = time.time()
                x = mod.sample_chunked(denoiser, a.samples, codec.dim, args.edis_sample_steps, noise,
                                       guidance=guidance, guide_sigma_max=sigma_max).detach()
                speed[f"{form}: {name}"] = a.samples / (time.time() - t3)
                rows.append(measure(f"{form}: {name}", to_raw(codec.decode(x)), env, online_ref, norm_state,
                                    bandwidth, policy_mean))
                r = rows[-1]
                print(f"seed {seed} {form}: {name:>9}: dyn err {r['dynamics_error_mean']:.4f}  reward err "
                      f"{r['reward_error_mean']:.3f}  walls {r['states_in_walls']:.3f}  MMD2 {r['mmd2_to_online']:.4f}"
                      f"  pi {r['policy_action_dist']:.3f}", flush=True)
        result = {"algo": a.algo, "seed": seed, "checkpoint": os.path.relpath(ckpt_path, ROOT),
                  "online_transitions_train": online.size, "held_out": n_held, "samples": a.samples,
                  "energy_steps": a.energy_steps, "overrides": list(a.overrides),
                  "sample_steps": args.edis_sample_steps, "samples_per_s": speed, "energy_acc": energy_acc,
                  "timing_s": timing, "rows": rows, "wall_s": round(time.time() - t0, 1), **machine_info()}
        with open(os.path.join(a.out, f"{a.algo}_seed{seed}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Cli))
