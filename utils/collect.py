"""Collect a PointMaze dataset locally and write it as a real Minari dataset.

    python -m utils.collect pointmaze-umaze            # 1M steps, as D4RL/Minari, into the Minari cache
    python -m utils.collect pointmaze-large --num-steps 200000 --seed 1

The protocol is the one D4RL used for maze2d and Minari for ``D4RL/pointmaze/*-v2``: the goal-conditioned
PointMaze env runs as a continuing task; a waypoint controller plans a shortest path over maze cells (breadth-first
search from the goal cell), a PD controller follows the waypoints, Gaussian noise is added to every action, and
when the ball reaches the goal a new goal is drawn and a new episode starts where the ball is (the episode that
reached its goal ends with a truncation, as in Minari's data). An episode that has not reached its goal after
``max_episode_steps`` is truncated and the env is reset.

The result is written with ``minari.create_dataset_from_buffers`` under the id ``local/pointmaze/<maze>-v0`` in the
same cache the loader reads (``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``), so it is loaded by the same code
as the official ``D4RL/pointmaze/<maze>-v2`` download, but is never mistaken for it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional

import gymnasium as gym
import numpy as np

from utils.common import UserError, run_cli
from utils.tasks import TaskSpec, get_task, minari_dataset_dir, minari_root, register_envs

DEFAULT_STEPS = 1_000_000  # the size of the official D4RL/Minari PointMaze datasets
PD_GAINS = (10.0, 1.0)  # (p, d): action = p * (target - xy) - d * velocity, Minari's pointmaze controller gains
ACTION_NOISE = 0.5  # std of the Gaussian action noise, as in Minari's pointmaze generation script


# --------------------------------------------------------------------------------------------------------------
# Writing Minari datasets from episodes (also used by the tests for AntMaze and Hopper data)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Episode:
    """One episode in Minari's layout: ``observations`` holds T+1 entries (a list of dicts or arrays)."""

    observations: list
    actions: list = dataclasses.field(default_factory=list)
    rewards: list = dataclasses.field(default_factory=list)
    terminations: list = dataclasses.field(default_factory=list)
    truncations: list = dataclasses.field(default_factory=list)
    infos: list = dataclasses.field(default_factory=list)  # T+1 info dicts (the reset info first)
    seed: Optional[int] = None

    def to_buffer(self, episode_id: int):
        from minari.data_collector import EpisodeBuffer

        def stack(items):
            if isinstance(items[0], dict):
                return {k: np.stack([np.asarray(x[k]) for x in items]) for k in items[0]}
            return np.stack([np.asarray(x) for x in items])

        infos = stack(self.infos) if self.infos else None
        return EpisodeBuffer(
            id=episode_id, seed=self.seed, observations=stack(self.observations),
            actions=np.asarray(self.actions, dtype=np.float32), rewards=list(map(float, self.rewards)),
            terminations=list(map(bool, self.terminations)), truncations=list(map(bool, self.truncations)),
            infos=infos)


def rollout(env: gym.Env, policy: Callable, max_steps: int, seed: Optional[int] = None,
            info_keys: tuple = ("success",)) -> Episode:
    """Run ``policy(obs) -> action`` for one episode of at most ``max_steps`` steps (truncated after that)."""
    obs, info = env.reset(seed=seed)
    ep = Episode(observations=[obs], infos=[_pick(info, info_keys)], seed=seed)
    for t in range(max_steps):
        action = policy(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        truncated = truncated or (t == max_steps - 1 and not terminated)
        ep.observations.append(obs)
        ep.actions.append(action)
        ep.rewards.append(reward)
        ep.terminations.append(terminated)
        ep.truncations.append(truncated)
        ep.infos.append(_pick(info, info_keys))
        if terminated or truncated:
            break
    return ep


def _pick(info: dict, keys: tuple) -> dict:
    return {k: np.asarray(info.get(k, False)) for k in keys}


def write_minari_dataset(dataset_id: str, episodes: list, env: gym.Env, eval_env_spec=None, overwrite: bool = False,
                         **metadata):
    """Write ``episodes`` as the Minari dataset ``dataset_id`` in the local cache and return the ``MinariDataset``."""
    import minari

    path = minari_dataset_dir(dataset_id)
    if os.path.exists(path):
        if not overwrite:
            raise UserError(f"Minari dataset {dataset_id} already exists at {path} (pass --overwrite to replace it)")
        shutil.rmtree(path)
    buffers = [ep.to_buffer(i) for i, ep in enumerate(episodes)]
    metadata.setdefault("author", "reference-rl (generated locally)")
    metadata.setdefault("author_email", "none@localhost")
    metadata.setdefault("code_permalink", "utils/collect.py")
    # Written into a temporary Minari root next to the cache, then renamed into place: an interrupted collection
    # never leaves a half-written dataset that later runs would take for a cached one.
    root = minari_root()
    os.makedirs(root, exist_ok=True)
    tmp_root = tempfile.mkdtemp(dir=root, prefix=".tmp-collect-")
    saved = os.environ.get("MINARI_DATASETS_PATH")
    try:
        os.environ["MINARI_DATASETS_PATH"] = tmp_root
        minari.create_dataset_from_buffers(dataset_id=dataset_id, buffer=buffers, env=env, eval_env=eval_env_spec,
                                           **metadata)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(os.path.join(tmp_root, dataset_id), path)
    finally:
        if saved is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = saved
        shutil.rmtree(tmp_root, ignore_errors=True)
    return minari.load_dataset(dataset_id)


# --------------------------------------------------------------------------------------------------------------
# The waypoint controller
# --------------------------------------------------------------------------------------------------------------
def bfs_next_cell(maze_map: list, goal: tuple) -> dict:
    """For every free cell reachable from ``goal``: the neighbouring cell one step closer to ``goal``.

    Breadth-first search outward from the goal over the 4-connected free cells (any entry other than 1).
    """
    def free(rc):
        return 0 <= rc[0] < len(maze_map) and 0 <= rc[1] < len(maze_map[0]) and maze_map[rc[0]][rc[1]] != 1
    nxt = {goal: goal}
    queue = collections.deque([goal])
    while queue:
        cell = queue.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nb = (cell[0] + dr, cell[1] + dc)
            if free(nb) and nb not in nxt:
                nxt[nb] = cell  # from nb, step to cell (one closer to the goal)
                queue.append(nb)
    return nxt


class WaypointController:
    """Plan over maze cells towards ``desired_goal``, then PD-control the ball to the next cell centre."""

    def __init__(self, maze, gains: tuple = PD_GAINS):
        self.maze = maze
        self.kp, self.kd = gains
        self._goal_xy = None
        self._plan = None

    def _cell(self, xy) -> tuple:
        return tuple(int(v) for v in self.maze.cell_xy_to_rowcol(np.asarray(xy)))

    def __call__(self, obs: dict) -> np.ndarray:
        xy, vel, goal_xy = obs["achieved_goal"], obs["observation"][2:4], obs["desired_goal"]
        if self._goal_xy is None or np.any(self._goal_xy != goal_xy):  # new goal: re-plan
            self._goal_xy = np.array(goal_xy)
            self._goal_cell = self._cell(goal_xy)
            self._plan = bfs_next_cell(self.maze.maze_map, self._goal_cell)
        cell = self._cell(xy)
        nxt = self._plan.get(cell, self._goal_cell)
        target = goal_xy if nxt == self._goal_cell or cell == self._goal_cell else self.maze.cell_rowcol_to_xy(
            np.array(nxt))
        return self.kp * (np.asarray(target) - xy) - self.kd * vel


# --------------------------------------------------------------------------------------------------------------
# PointMaze collection
# --------------------------------------------------------------------------------------------------------------
def collect_pointmaze_episodes(task: TaskSpec, num_steps: int, seed: int = 0, noise: float = ACTION_NOISE,
                               progress: bool = False) -> tuple:
    """Run the noisy waypoint controller for ``num_steps`` env steps; return (episodes, collection env)."""
    register_envs()
    # Collection env: the task's maze with random goals and starts (the registered default map), continuing task
    # that draws a new goal when the current one is reached; no time limit (episodes are cut below).
    env = gym.make(task.env_id, continuing_task=True, reset_target=True, max_episode_steps=num_steps + 1)
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    controller = WaypointController(env.unwrapped.maze)
    info_keys = ("success",)
    episodes, ep_seed = [], seed
    obs, info = env.reset(seed=ep_seed)
    ep = Episode(observations=[obs], infos=[_pick(info, info_keys)], seed=ep_seed)
    bar = _progress(num_steps, progress, f"collecting {task.name}")
    for step in range(num_steps):
        action = np.clip(controller(obs) + noise * rng.standard_normal(2), -1.0, 1.0).astype(np.float32)
        obs, reward, terminated, _, info = env.step(action)
        success = bool(info["success"])
        cut = success or len(ep.actions) + 1 >= task.max_episode_steps or step == num_steps - 1
        ep.observations.append(obs)
        ep.actions.append(action)
        ep.rewards.append(reward)
        ep.terminations.append(terminated)  # always False: the collection task is continuing
        ep.truncations.append(cut)
        ep.infos.append(_pick(info, info_keys))
        if bar is not None:
            bar.update(1)
        if not cut:
            continue
        episodes.append(ep)
        if success:  # keep going from here towards the freshly drawn goal (the env already moved it)
            obs = {k: np.array(v) for k, v in obs.items()}
            obs["desired_goal"] = np.array(env.unwrapped.goal)
            info = {"success": False}
        else:  # timed out without reaching the goal: start over
            ep_seed += 1
            obs, info = env.reset(seed=ep_seed)
        ep = Episode(observations=[obs], infos=[_pick(info, info_keys)], seed=ep_seed)
    if bar is not None:
        bar.close()
    return episodes, env


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=1.0, file=sys.stderr)


def collect_pointmaze(task: TaskSpec, num_steps: Optional[int] = None, seed: int = 0, dataset_id: Optional[str] = None,
                      overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print):
    """Collect ``num_steps`` transitions for ``task`` and write them as a Minari dataset; return the dataset."""
    if task.family != "pointmaze":
        raise UserError(f"local collection supports the pointmaze-* tasks only, not {task.name}: AntMaze and Adroit "
                        f"data need the official Minari datasets (minari download {task.minari_id})")
    num_steps = int(num_steps or DEFAULT_STEPS)
    if num_steps <= 0:
        raise UserError(f"--num-steps must be positive, got {num_steps}")
    dataset_id = dataset_id or task.local_minari_id
    t0 = time.time()
    episodes, env = collect_pointmaze_episodes(task, num_steps, seed=seed, progress=progress)
    eval_spec = gym.spec(task.env_id)
    eval_spec = dataclasses.replace(eval_spec, max_episode_steps=task.max_episode_steps,
                                    kwargs={**eval_spec.kwargs, **task.env_kwargs})
    ds = write_minari_dataset(
        dataset_id, episodes, env=env, eval_env_spec=eval_spec, overwrite=overwrite,
        algorithm_name="BFS waypoints + PD controller + Gaussian action noise (utils/collect.py)",
        description=(f"LOCALLY GENERATED stand-in for {task.minari_id} (D4RL {task.d4rl_name}): {num_steps} steps "
                     f"collected by utils/collect.py with seed {seed}, action noise std {ACTION_NOISE}. Not the "
                     f"official dataset."),
        ref_min_score=task.ref_min_score, ref_max_score=task.ref_max_score,
        requirements=["gymnasium-robotics>=1.4"])
    env.close()
    n_success = sum(bool(ep.infos[-1]["success"]) for ep in episodes)
    log(f"wrote {dataset_id}: {len(episodes)} episodes ({n_success} reached their goal), {num_steps} steps, "
        f"{time.time() - t0:.1f}s, at {minari_dataset_dir(dataset_id)}")
    return ds


def main(argv: Optional[list] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m utils.collect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("env", help="pointmaze task: pointmaze-{umaze,medium,large}[-dense]")
    p.add_argument("--num-steps", type=int, default=DEFAULT_STEPS, help="env steps to collect (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the env resets and the action noise")
    p.add_argument("--dataset-id", default=None, help="Minari id to write (default: local/pointmaze/<maze>-v0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same id")
    args = p.parse_args(argv)
    collect_pointmaze(get_task(args.env), args.num_steps, seed=args.seed, dataset_id=args.dataset_id,
                      overwrite=args.overwrite)


if __name__ == "__main__":
    run_cli(main)
