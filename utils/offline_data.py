"""Offline-RL data layer shared by ``edis_iql.py`` and ``edis_calql.py``.

What users mean by "d4rl" is kept without the legacy ``d4rl`` package (it cannot be installed or imported on
Python >= 3.11, see docs/data.md): the D4RL task names (``--env antmaze-large``), the D4RL hdf5 layout
(``--dataset-path file.hdf5``) and the D4RL normalized score. Environments come from gymnasium, mujoco and
gymnasium-robotics; datasets from Minari (the D4RL datasets re-collected in the gymnasium-robotics envs).

Public API
----------
``get_task(name)``            -> ``TaskSpec`` (raises ``UserError`` listing valid names for a typo)
``load_offline_data(task)``    -> ``OfflineData`` with flat float32 arrays
                                  (Minari cache -> download -> local collection)
``load_d4rl_hdf5(path, task)`` -> ``OfflineData`` from a D4RL-layout hdf5 file
``make_env(task)``             -> a gymnasium env whose observations are flattened exactly like the dataset's
``normalized_score(task, R)``  -> D4RL normalized score ``100 * (R - min) / (max - min)``

Conventions of ``OfflineData`` (one row per transition, in episode order):
* ``next_observations[i]`` is the true next observation of transition ``i``; it is never the first observation of
  the following episode (no stitching across episode ends).
* ``terminals[i] = 1`` only for true environment terminations (bootstrapping stops there); ``timeouts[i] = 1`` for
  time-limit truncations (bootstrapping continues). They are kept distinct.
* ``episode_ends[i] = True`` marks the last transition of each episode (needed for Monte-Carlo returns-to-go).
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

from utils.common import UserError, env_flag, network_available


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
# Datasets
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OfflineData:
    """Flat transition arrays in D4RL's ``qlearning_dataset`` naming (see the module docstring for conventions)."""

    observations: np.ndarray  # [N, obs_dim] float32
    actions: np.ndarray  # [N, act_dim] float32
    rewards: np.ndarray  # [N] float32
    next_observations: np.ndarray  # [N, obs_dim] float32
    terminals: np.ndarray  # [N] float32, 1 = true termination
    timeouts: np.ndarray  # [N] float32, 1 = time-limit truncation
    episode_ends: np.ndarray  # [N] bool, last transition of its episode
    source: str = ""  # where the data came from, for logs

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def num_episodes(self) -> int:
        return int(self.episode_ends.sum())

    def episode_slices(self) -> list:
        """``[slice(start, end), ...]`` for each episode, in order."""
        ends = np.flatnonzero(self.episode_ends) + 1
        starts = np.concatenate([[0], ends[:-1]])
        return [slice(int(s), int(e)) for s, e in zip(starts, ends)]

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode (handy for reward scaling and sanity checks)."""
        ends = np.flatnonzero(self.episode_ends)
        csum = np.concatenate([[0.0], np.cumsum(self.rewards, dtype=np.float64)])
        starts = np.concatenate([[0], ends[:-1] + 1])
        return csum[ends + 1] - csum[starts]


def minari_root() -> str:
    """The Minari cache folder: ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets`` (as minari resolves it)."""
    return os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")


def minari_dataset_dir(dataset_id: str) -> str:
    return os.path.join(minari_root(), dataset_id)


def is_cached(dataset_id: str) -> bool:
    return os.path.isdir(os.path.join(minari_dataset_dir(dataset_id), "data"))


def from_minari(dataset, obs_keys: Optional[tuple], source: str = "") -> OfflineData:
    """Flatten a ``minari.MinariDataset`` episode by episode (each episode stores T+1 observations)."""
    obs, nobs, act, rew, term, tout, ends = [], [], [], [], [], [], []
    for ep in dataset.iterate_episodes():
        o = flatten_obs(ep.observations, obs_keys)
        T = len(ep.rewards)
        if T == 0:
            continue
        obs.append(o[:-1])
        nobs.append(o[1:])  # the episode's own next observations: never stitched to the next episode
        act.append(np.asarray(ep.actions, dtype=np.float32).reshape(T, -1))
        rew.append(np.asarray(ep.rewards, dtype=np.float32).reshape(T))
        term.append(np.asarray(ep.terminations, dtype=np.float32).reshape(T))
        tout.append(np.asarray(ep.truncations, dtype=np.float32).reshape(T))
        e = np.zeros(T, dtype=bool)
        e[-1] = True
        ends.append(e)
    if not obs:
        raise UserError(f"dataset {source} holds no transitions")
    cat = np.concatenate
    return OfflineData(cat(obs), cat(act), cat(rew), cat(nobs), cat(term), cat(tout), cat(ends), source=source)


def load_d4rl_hdf5(path: str, task: Optional[TaskSpec] = None) -> OfflineData:
    """Read a D4RL-layout hdf5 file (``observations, actions, rewards, terminals[, timeouts, next_observations]``).

    Episodes end at ``terminals | timeouts``. Without a ``next_observations`` key, ``next_obs[i] = obs[i+1]`` inside
    an episode; the last step of a timed-out episode has no stored next observation and is dropped (as
    ``d4rl.qlearning_dataset`` does), and a terminal step keeps ``next_obs = obs[i]`` as a placeholder (never
    used: bootstrapping stops at terminals). So nothing is stitched across episode ends.
    """
    import h5py

    if not os.path.isfile(path):
        raise UserError(f"--dataset-path {path!r} does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
            if missing:
                raise UserError(f"{path} is not a D4RL-layout hdf5 file: missing {', '.join(missing)} datasets")
            keys = [k for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
                    if k in f]
            for k in keys:
                if not isinstance(f[k], h5py.Dataset):
                    raise UserError(f"{path}: '{k}' is an hdf5 group, not an array")
            d = {k: f[k][()] for k in keys}
    except OSError as e:
        raise UserError(f"cannot read {path} as hdf5: {e}") from None
    d = _validated_arrays(d, path)
    obs, act, rew, n = d["observations"], d["actions"], d["rewards"], len(d["observations"])
    term = d["terminals"].astype(bool)
    tout = d["timeouts"].astype(bool) if "timeouts" in d else np.zeros(n, bool)
    done = term | tout
    last_of_ep = done.copy()
    last_of_ep[-1] = True  # the file's last row ends an episode whatever its flags
    if "next_observations" in d:
        nobs = np.asarray(d["next_observations"], dtype=np.float32)
        keep = np.ones(n, dtype=bool)
    else:
        nobs = np.concatenate([obs[1:], obs[-1:]])
        nobs[term] = obs[term]  # placeholder for terminal steps (unused by the TD target)
        keep = ~(last_of_ep & ~term)  # drop an episode's last row when its true next observation is unknown
    # After dropping rows, the episode end moves to the previous kept row of the same episode.
    ep_id = np.concatenate([[0], np.cumsum(last_of_ep[:-1])])
    kept_ep = ep_id[keep]
    ends = np.ones(len(kept_ep), dtype=bool)
    ends[:-1] = kept_ep[1:] != kept_ep[:-1]
    data = OfflineData(obs[keep], act[keep], rew[keep], nobs[keep], term[keep].astype(np.float32),
                       tout[keep].astype(np.float32), ends, source=f"D4RL hdf5 {path}")
    if len(data) == 0:
        raise UserError(f"{path} holds no usable transitions")
    if task is not None:
        _check_shapes(data, task, path)
    return data


def _validated_arrays(d: dict, path: str) -> dict:
    """The D4RL arrays as float32 with checked shapes: observations [N, obs_dim] with N >= 1, actions [N, act_dim]
    (or [N] for one action dimension), rewards / terminals / timeouts [N] (or [N, 1]), next_observations like
    observations, all numeric and finite. Nothing is reshaped to fit: a misaligned file is refused."""
    out = {}
    for k, v in d.items():
        v = np.asarray(v)
        if not (np.issubdtype(v.dtype, np.number) or v.dtype == bool):
            raise UserError(f"{path}: '{k}' holds {v.dtype} values, not numbers")
        out[k] = v.astype(np.float32)
    obs = out["observations"]
    if obs.ndim != 2 or len(obs) == 0 or obs.shape[1] == 0:
        raise UserError(f"{path}: 'observations' must be a non-empty [N, obs_dim] array, got shape {obs.shape}")
    n = len(obs)
    for k, v in out.items():
        if k == "observations":
            continue
        if k == "next_observations":
            ok = v.shape == obs.shape
            want = f"{obs.shape} like 'observations'"
        elif k == "actions":
            ok = v.ndim in (1, 2) and len(v) == n and (v.ndim == 1 or v.shape[1] >= 1)
            want = f"[{n}, act_dim]"
        else:
            ok = v.shape in ((n,), (n, 1))
            want = f"[{n}]"
        if not ok:
            raise UserError(f"{path}: '{k}' has shape {v.shape}, expected {want} (one row per observation)")
        out[k] = v.reshape(n, -1) if k == "actions" else v if k == "next_observations" else v.reshape(n)
    for k in ("observations", "actions", "rewards", "next_observations"):
        if k in out and not np.isfinite(out[k]).all():
            bad = int(np.flatnonzero(~np.isfinite(out[k]).reshape(n, -1).all(1))[0])
            raise UserError(f"{path}: '{k}' has non-finite values (first at row {bad})")
    return out


def _check_shapes(data: OfflineData, task: TaskSpec, where: str) -> None:
    env = make_env(task)
    try:
        want_obs, want_act = env.observation_space.shape[0], env.action_space.shape[0]
    finally:
        env.close()
    got_obs, got_act = data.observations.shape[1], data.actions.shape[1]
    if (got_obs, got_act) != (want_obs, want_act):
        raise UserError(
            f"{where}: observation/action sizes {got_obs}/{got_act} do not match --env {task.name} "
            f"({task.env_id}: {want_obs}/{want_act})")


# ------------------------------- Minari: local cache -> download -> local collection ---------------------------
def _remote_host() -> str:
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    return "storage.googleapis.com" if remote.startswith("gcp://") else "huggingface.co"


def why_no_download() -> Optional[str]:
    """None when a Minari download can be attempted, else the reason it cannot (shown to the user)."""
    if _remote_host() == "huggingface.co":
        try:
            import huggingface_hub  # noqa: F401  (minari's hf remote needs it: the `minari[hf]` extra)
        except ImportError:
            return 'downloads need the optional extra: pip install "minari[hf]"'
        if env_flag("HF_HUB_OFFLINE"):
            return "HF_HUB_OFFLINE is set"
    if not network_available(_remote_host()):
        return f"no network connection to {_remote_host()}"
    return None


def _download(dataset_id: str) -> None:
    import minari

    try:
        minari.download_dataset(dataset_id)
    except Exception as e:  # network errors surface as many types (httpx, huggingface_hub, OSError, ValueError)
        raise UserError(f"downloading Minari dataset {dataset_id} failed: {type(e).__name__}: {e}") from None


def _load_minari(dataset_id: str, obs_keys: Optional[tuple]) -> OfflineData:
    import minari

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = minari.load_dataset(dataset_id)
    return from_minari(ds, obs_keys, source=f"Minari {dataset_id} ({minari_dataset_dir(dataset_id)})")


def _load_minari_path(path: str, obs_keys: Optional[tuple]) -> OfflineData:
    from minari import MinariDataset

    data_dir = path if os.path.basename(os.path.normpath(path)) == "data" else os.path.join(path, "data")
    if not os.path.isfile(os.path.join(data_dir, "metadata.json")):
        raise UserError(f"--dataset-path {path!r} is neither a D4RL hdf5 file nor a Minari dataset folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = MinariDataset(data_dir)
        data = from_minari(ds, obs_keys, source=f"Minari folder {path}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (minari and h5py raise many types for a damaged folder)
        raise UserError(f"--dataset-path {path}: cannot read it as a Minari dataset ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    _validated_arrays({"observations": data.observations, "actions": data.actions, "rewards": data.rewards,
                       "next_observations": data.next_observations}, path)
    return data


def load_offline_data(
    task: TaskSpec,
    dataset_path: Optional[str] = None,
    download: bool = True,
    collect_if_missing: bool = True,
    collect_steps: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> OfflineData:
    """Load the offline dataset of ``task``.

    Order: ``dataset_path`` if given (D4RL hdf5 file or Minari dataset folder); else the official Minari dataset
    from the local cache; else a download (when possible, checked in seconds); else, for PointMaze, the locally
    collected stand-in (collected now if missing, and logged). Anything else is a one-line ``UserError`` that
    names the dataset id, the cache folder, and how to get the data.
    """
    if dataset_path:
        path = os.path.expanduser(dataset_path)
        if not os.path.exists(path):
            raise UserError(f"--dataset-path {dataset_path!r} does not exist")
        if os.path.isfile(path) and not path.endswith("main_data.hdf5"):
            return load_d4rl_hdf5(path, task)
        data = _load_minari_path(os.path.dirname(path) if os.path.isfile(path) else path, task.obs_keys)
        _check_shapes(data, task, dataset_path)
        return data

    if is_cached(task.minari_id):
        return _load_minari(task.minari_id, task.obs_keys)

    reason = why_no_download() if download else "downloads disabled"
    if reason is None:
        log(f"downloading Minari dataset {task.minari_id} into {minari_root()} ...")
        _download(task.minari_id)
        return _load_minari(task.minari_id, task.obs_keys)

    if task.collectable and (is_cached(task.local_minari_id) or collect_if_missing):
        if not is_cached(task.local_minari_id):
            from utils.collect import collect_pointmaze

            log(f"{task.minari_id} is not cached and cannot be downloaded ({reason}); collecting the local "
                f"stand-in {task.local_minari_id} in {task.env_id} (waypoint controller + action noise) ...")
            collect_pointmaze(task, num_steps=collect_steps, log=log)
        else:
            log(f"using the locally collected dataset {task.local_minari_id} ({task.minari_id} is not cached)")
        return _load_minari(task.local_minari_id, task.obs_keys)

    extra = f" or run `python -m utils.collect {task.name}` to collect a local stand-in," if task.collectable else ""
    raise UserError(
        f"Minari dataset {task.minari_id} (for --env {task.name}) is not in the local cache "
        f"{minari_dataset_dir(task.minari_id)} (MINARI_DATASETS_PATH={minari_root()}) and cannot be downloaded "
        f"({reason}). Get it with `pip install \"minari[hf]\" && minari download {task.minari_id}` on a machine "
        f"with internet and copy that folder here (or point MINARI_DATASETS_PATH at it),{extra} or pass "
        f"--dataset-path to a D4RL-layout hdf5 file of {task.d4rl_name}.")
