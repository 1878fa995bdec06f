"""Tasks shared by ``edis_iql.py`` and ``edis_calql.py``: the D4RL task registry, maze layouts, evaluation
environments (observations flattened exactly like the datasets'), the D4RL normalized score, and where Minari keeps
its datasets.

Public API
----------
``get_task(name)``            -> ``TaskSpec`` (raises ``UserError`` listing valid names for a typo)
``make_env(task)``             -> a gymnasium env whose observations are flattened exactly like the dataset's
``normalized_score(task, R)``  -> D4RL normalized score ``100 * (R - min) / (max - min)``
``minari_root()``              -> the Minari cache folder
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import warnings
from typing import Callable, Optional

import gymnasium as gym
import numpy as np

from utils.common import UserError


def _mujoco_warnings_to_python() -> None:
    """MuJoCo's default handler appends its warnings to MUJOCO_LOG.TXT in the working directory (a user's project, or
    this repository during the tests); send them to Python's ``warnings`` instead (shown once per message)."""
    try:
        import mujoco
    except ImportError:
        return
    mujoco.set_mju_user_warning(lambda msg: warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=2))


_mujoco_warnings_to_python()

# ---------------------------------------------------------------------------------------------------------------
# Task registry
# ---------------------------------------------------------------------------------------------------------------
R, G = "r", "g"  # gymnasium-robotics maze-map markers: reset cell, goal cell

# The maze layouts of gymnasium-robotics (envs/maze/maps.py: U_MAZE, MEDIUM_MAZE, LARGE_MAZE; 1 = wall), which are
# D4RL's, row by row.
MAZES = {
    "umaze": ["11111",
              "10001",
              "11101",
              "10001",
              "11111"],
    "medium": ["11111111",
               "10011001",
               "10010001",
               "11000111",
               "10010001",
               "10100101",
               "10001001",
               "11111111"],
    "large": ["111111111111",
              "100001000001",
              "101101010101",
              "100000010001",
              "101111011101",
              "100101000001",
              "110101010111",
              "100100010001",
              "111111111111"],
}


def maze_map(maze: str, reset: Optional[tuple] = None, goal: Optional[tuple] = None) -> list:
    """A gymnasium-robotics ``maze_map`` of ``maze`` with an optional fixed reset cell "r" and goal cell "g"."""
    rows = [[int(c) for c in row] for row in MAZES[maze]]
    for cell, mark in ((reset, R), (goal, G)):
        if cell is not None:
            assert rows[cell[0]][cell[1]] == 0, f"{maze}: cell {cell} is a wall"
            rows[cell[0]][cell[1]] = mark
    return rows


# AntMaze evaluation: a fixed start "r" and goal "g" at the two ends of the maze, D4RL's antmaze tasks (umaze: around
# the U, as Minari's umaze collection map; medium (1,1) -> (6,6) and large (1,1) -> (7,9), as Minari's
# eval_env_spec), with continuing_task=False so an episode ends at the goal and the D4RL normalized score is
# 100 x success rate, as with D4RL's eval=True AntMaze envs.
ANTMAZE_EVAL_CELLS = {"umaze": ((3, 1), (1, 1)), "medium": ((1, 1), (6, 6)), "large": ((1, 1), (7, 9))}
# PointMaze evaluation: D4RL maze2d's protocol, a fixed goal cell (d4rl/pointmaze/maze_model.py) and a random start
# cell; the goal does not move and the episode does not end there, so reward accumulates over the 300/600/800-step
# horizon and the D4RL maze2d reference scores apply, approximately (see docs/data.md).
POINTMAZE_GOAL_CELLS = {"umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}


# D4RL reference returns, copied from d4rl/infos.py (REF_MIN_SCORE / REF_MAX_SCORE). Normalized score =
# 100 * (R - min) / (max - min) with R the undiscounted return of one evaluation episode.
D4RL_REF_SCORES = {
    "antmaze": (0.0, 1.0),
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867),
    "relocate": (-6.425911, 4233.877797728884),
    "maze2d-umaze": (23.85, 161.86),
    "maze2d-medium": (13.13, 277.39),
    "maze2d-large": (6.7, 273.99),
    "maze2d-umaze-dense": (68.537689, 193.66285642381482),
    "maze2d-medium-dense": (44.264742, 297.4552547777125),
    "maze2d-large-dense": (30.569041, 303.4857382709002),
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the scripts need to know about one ``--env`` name."""

    name: str
    """D4RL-style short name, e.g. ``antmaze-large-diverse``."""
    family: str
    """``antmaze``, ``adroit``, ``mujoco`` or ``pointmaze`` (selects the per-family algorithm presets)."""
    minari_id: str
    """Official Minari dataset id, e.g. ``D4RL/antmaze/large-diverse-v1``."""
    env_id: str
    """gymnasium(-robotics) env id used for online interaction and evaluation."""
    env_kwargs: dict
    """Extra ``gym.make`` kwargs for that env (the evaluation protocol, e.g. the AntMaze eval map)."""
    max_episode_steps: int
    """Episode horizon of online and evaluation episodes (D4RL's horizon for the task)."""
    ref_min_score: float
    """D4RL reference return of a random policy (d4rl/infos.py)."""
    ref_max_score: float
    """D4RL reference return of an expert policy (d4rl/infos.py)."""
    goal_reaching: bool
    """True when ``info["success"]`` marks reaching a goal (AntMaze, PointMaze): success rate is reported."""
    d4rl_name: str
    """The D4RL dataset name this task stands for (for humans and for ``--dataset-path`` files)."""
    obs_keys: Optional[tuple] = None
    """For dict observations: the keys concatenated, in order, into the flat observation (dataset and env alike)."""
    local_minari_id: Optional[str] = None
    """Id of the locally collected stand-in dataset (PointMaze only: ``python -m utils.collect <name>``)."""
    position_dims: tuple = ()
    """Indices of the agent's maze position (x, y) in the flat observation (AntMaze, PointMaze: (0, 1)); empty for
    tasks without a maze. EDIS's energies can give these coordinates, on which the walls depend, finer features."""

    @property
    def collectable(self) -> bool:
        return self.local_minari_id is not None


def _build_registry() -> dict:
    tasks = {}

    def add(**kw):
        tasks[kw["name"]] = TaskSpec(**kw)

    # AntMaze: D4RL antmaze-*-v2 -> Minari D4RL/antmaze/*-v1, collected in AntMaze_*-v4 (27-d `observation`).
    # Flat observation = [achieved_goal (x, y), observation] = 29-d, D4RL's layout (qpos[:15] ++ qvel[:14]).
    antmaze_envs = {
        "umaze": ("AntMaze_UMaze-v4", "umaze", 700),
        "umaze-diverse": ("AntMaze_UMaze-v4", "umaze", 700),
        "medium-play": ("AntMaze_Medium-v4", "medium", 1000),
        "medium-diverse": ("AntMaze_Medium_Diverse_GR-v4", "medium", 1000),
        "large-play": ("AntMaze_Large-v4", "large", 1000),
        "large-diverse": ("AntMaze_Large_Diverse_GR-v4", "large", 1000),
    }
    for ds, (env_id, maze, horizon) in antmaze_envs.items():
        add(
            name=f"antmaze-{ds}",
            family="antmaze",
            minari_id=f"D4RL/antmaze/{ds}-v1",
            env_id=env_id,
            env_kwargs=dict(maze_map=maze_map(maze, *ANTMAZE_EVAL_CELLS[maze]), continuing_task=False,
                            reset_target=False),
            max_episode_steps=horizon,
            ref_min_score=D4RL_REF_SCORES["antmaze"][0],
            ref_max_score=D4RL_REF_SCORES["antmaze"][1],
            goal_reaching=True,
            d4rl_name=f"antmaze-{ds}-v2",
            obs_keys=("achieved_goal", "observation"),
            position_dims=(0, 1),
        )
    # Adroit: D4RL {task}-{ds}-v1 -> Minari D4RL/{task}/{ds}-v2, env AdroitHand{Task}-v1; D4RL horizons 100 / 200.
    for task in ("pen", "door", "hammer", "relocate"):
        for ds in ("human", "cloned", "expert"):
            add(
                name=f"{task}-{ds}",
                family="adroit",
                minari_id=f"D4RL/{task}/{ds}-v2",
                env_id=f"AdroitHand{task.capitalize()}-v1",
                env_kwargs={},
                max_episode_steps=100 if task == "pen" else 200,
                ref_min_score=D4RL_REF_SCORES[task][0],
                ref_max_score=D4RL_REF_SCORES[task][1],
                goal_reaching=False,
                d4rl_name=f"{task}-{ds}-v1",
            )
    # Locomotion: no D4RL copy on Minari; mujoco/{env}/{simple,medium,expert}-v0 were collected in the v5 envs.
    # D4RL's reference scores are kept so numbers are on the familiar scale (only approximately comparable).
    for env, env_id in (("hopper", "Hopper-v5"), ("halfcheetah", "HalfCheetah-v5"), ("walker2d", "Walker2d-v5")):
        for ds in ("simple", "medium", "expert"):
            add(
                name=f"{env}-{ds}",
                family="mujoco",
                minari_id=f"mujoco/{env}/{ds}-v0",
                env_id=env_id,
                env_kwargs={},
                max_episode_steps=1000,
                ref_min_score=D4RL_REF_SCORES[env][0],
                ref_max_score=D4RL_REF_SCORES[env][1],
                goal_reaching=False,
                d4rl_name=f"{env}-{ds}-v2",
            )
    # PointMaze: D4RL maze2d-* -> Minari D4RL/pointmaze/*-v2 (PointMaze_*-v3). Goals vary in the data, so the flat
    # observation is [observation (x, y, vx, vy), desired_goal (x, y)] = 6-d.
    for maze, env_maze, horizon in (("umaze", "UMaze", 300), ("medium", "Medium", 600), ("large", "Large", 800)):
        for dense in (False, True):
            sfx = "-dense" if dense else ""
            add(
                name=f"pointmaze-{maze}{sfx}",
                family="pointmaze",
                minari_id=f"D4RL/pointmaze/{maze}{sfx}-v2",
                env_id=f"PointMaze_{env_maze}{'Dense' if dense else ''}-v3",
                env_kwargs=dict(maze_map=maze_map(maze, goal=POINTMAZE_GOAL_CELLS[maze]), continuing_task=True,
                                reset_target=False),
                max_episode_steps=horizon,
                ref_min_score=D4RL_REF_SCORES[f"maze2d-{maze}{sfx}"][0],
                ref_max_score=D4RL_REF_SCORES[f"maze2d-{maze}{sfx}"][1],
                goal_reaching=True,
                d4rl_name=f"maze2d-{maze}{sfx}-v1",
                obs_keys=("observation", "desired_goal"),
                local_minari_id=f"local/pointmaze/{maze}{sfx}-v0",
                position_dims=(0, 1),
            )
    return tasks


TASKS: dict = _build_registry()

# What users type: `--env antmaze-large` means the harder, standard "diverse" dataset, as in the EDIS/Cal-QL papers.
ALIASES = {
    "antmaze-large": "antmaze-large-diverse",
    "antmaze-medium": "antmaze-medium-diverse",
}


def task_names() -> list:
    return sorted(TASKS) + sorted(ALIASES)


def get_task(name: str) -> TaskSpec:
    """Resolve a D4RL-style name (also accepts a trailing ``-v2``/``-v1`` and the aliases above)."""
    key = name.strip().lower()
    for suffix in ("-v0", "-v1", "-v2"):
        if key.endswith(suffix) and key[: -len(suffix)] in TASKS.keys() | ALIASES.keys():
            key = key[: -len(suffix)]
    key = ALIASES.get(key, key)
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, task_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown --env {name!r}.{hint} Valid names: {', '.join(task_names())}.")


def normalized_score(task: TaskSpec, returns) -> np.ndarray:
    """D4RL normalized score, ``100 * (R - ref_min) / (ref_max - ref_min)`` (d4rl.get_normalized_score x 100)."""
    r = np.asarray(returns, dtype=np.float64)
    return 100.0 * (r - task.ref_min_score) / (task.ref_max_score - task.ref_min_score)


# ---------------------------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------------------------
def register_envs() -> None:
    """Register the gymnasium-robotics envs (AntMaze, PointMaze, Adroit) with gymnasium."""
    import contextlib
    import io

    # Its import prints a notice about the Adroit *Dense* rewards (unused here) straight to stderr: keep logs clean.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)


def flatten_obs(obs, obs_keys: Optional[tuple]) -> np.ndarray:
    """One observation (or a batch: leading dims kept) as a flat float32 array, concatenating ``obs_keys``."""
    if obs_keys is None:
        if isinstance(obs, dict):
            raise UserError(f"got dict observations with keys {sorted(obs)} for a task with flat observations")
        return np.asarray(obs, dtype=np.float32)
    if not isinstance(obs, dict):
        raise UserError(f"expected dict observations with keys {obs_keys}, got a flat array")
    missing = [k for k in obs_keys if k not in obs]
    if missing:
        raise UserError(f"observations lack the keys {missing} (have {sorted(obs)})")
    return np.concatenate([np.asarray(obs[k], dtype=np.float32) for k in obs_keys], axis=-1)


def make_env(task: TaskSpec, seed: Optional[int] = None, render_mode: Optional[str] = None, **overrides):
    """The env of ``task`` with its evaluation protocol and observations flattened like the dataset's.

    Used for both online interaction and evaluation, as CORL does for D4RL tasks. ``overrides`` replace
    ``task.env_kwargs`` entries (e.g. ``max_episode_steps``).
    """
    register_envs()
    if render_mode is not None and sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # render on a machine without a display (read at first render)
    kwargs = dict(task.env_kwargs)
    kwargs.setdefault("max_episode_steps", task.max_episode_steps)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # AntMaze *-v4 is "out of date"; it is the data's env
        env = gym.make(task.env_id, render_mode=render_mode, **kwargs)
    xml = getattr(env.unwrapped, "tmp_xml_file_path", None)  # a maze's model, written to /tmp and never removed
    if xml and os.path.basename(xml).startswith("ant_maze") and os.path.isfile(xml):
        os.remove(xml)  # MuJoCo has loaded it
    env = FlatObservation(env, task.obs_keys)
    if seed is not None:
        env.action_space.seed(seed)
        env.observation_space.seed(seed)
    return env


class FlatObservation(gym.ObservationWrapper):
    """Observations as one flat float32 Box, computed by ``flatten_obs`` exactly as for the dataset.

    For dict observations the ``keys`` are concatenated in order; flat observations are only cast to float32.
    """

    def __init__(self, env, keys: Optional[tuple] = None):
        super().__init__(env)
        self.keys = tuple(keys) if keys is not None else None
        if self.keys is None:
            space = env.observation_space
            self.observation_space = gym.spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32),
                                                    dtype=np.float32)
        else:
            dim = sum(int(np.prod(env.observation_space[k].shape)) for k in self.keys)
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)

    def observation(self, observation):
        return flatten_obs(observation, self.keys)


# ---------------------------------------------------------------------------------------------------------------
# Where Minari keeps datasets
# ---------------------------------------------------------------------------------------------------------------
def minari_root() -> str:
    """The Minari cache folder: ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets`` (as minari resolves it)."""
    return os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")


def minari_dataset_dir(dataset_id: str) -> str:
    return os.path.join(minari_root(), dataset_id)


def is_cached(dataset_id: str) -> bool:
    return os.path.isdir(os.path.join(minari_dataset_dir(dataset_id), "data"))


def evaluate(task: TaskSpec, policy: Callable, episodes: int, seed: int, video_dir: Optional[str] = None) -> dict:
    """The evaluation protocol of the offline RL scripts: ``episodes`` deterministic episodes from resets seeded
    seed, seed + 1, ... (the same starts each time); the D4RL normalized score and the success rate. With
    ``video_dir`` the first episode is recorded there as an mp4 (gymnasium's RecordVideo, as CleanRL)."""
    env = make_env(task, render_mode="rgb_array" if video_dir else None)
    if video_dir is not None:
        env = gym.wrappers.RecordVideo(env, video_dir, name_prefix="eval", episode_trigger=lambda ep: ep == 0,
                                       disable_logger=True)
    returns, successes = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret, success = False, 0.0, False
        while not done:
            obs, r, terminated, truncated, info = env.step(policy(obs))
            ret += float(r)
            success |= bool(info.get("success", False))
            done = terminated or truncated
        returns.append(ret)
        successes.append(success)
    env.close()
    scores = normalized_score(task, returns)
    return {"eval/normalized_score": float(scores.mean()), "eval/normalized_score_std": float(scores.std()),
            "eval/return": float(np.mean(returns)), "eval/success_rate": float(np.mean(successes))}
