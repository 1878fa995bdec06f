"""Offline-RL data layer shared by ``edis_iql.py`` and ``edis_calql.py``.

What users mean by "d4rl" is kept without the legacy ``d4rl`` package (it cannot be installed or imported on
Python >= 3.11, see docs/data.md): the D4RL task names (``--env antmaze-large``), the D4RL hdf5 layout
(``--dataset-path file.hdf5``) and the D4RL normalized score. Environments come from gymnasium, mujoco and
gymnasium-robotics; datasets from Minari (the D4RL datasets re-collected in the gymnasium-robotics envs).

Public API (the tasks themselves, environments and scores are in ``utils/tasks.py``)
----------
``load_offline_data(task)``    -> ``OfflineData`` with flat float32 arrays
                                  (Minari cache -> download -> local collection)
``load_d4rl_hdf5(path, task)`` -> ``OfflineData`` from a D4RL-layout hdf5 file

Conventions of ``OfflineData`` (one row per transition, in episode order):
* ``next_observations[i]`` is the true next observation of transition ``i``; it is never the first observation of
  the following episode (no stitching across episode ends).
* ``terminals[i] = 1`` only for true environment terminations (bootstrapping stops there); ``timeouts[i] = 1`` for
  time-limit truncations (bootstrapping continues). They are kept distinct.
* ``episode_ends[i] = True`` marks the last transition of each episode (needed for Monte-Carlo returns-to-go).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Optional

import numpy as np

from utils.collect import collect_pointmaze
from utils.common import UserError, env_flag, network_available
from utils.tasks import TaskSpec, flatten_obs, is_cached, make_env, minari_dataset_dir, minari_root


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


def normalization(data: OfflineData, normalize_states: bool, reward_scale: float, reward_bias: float,
                  normalize_returns: bool, **_) -> dict:
    """The offline RL scripts' data conventions (CORL's): state mean/std (or 0 and 1), and rewards -> scale * r + bias,
    on locomotion after r * 1000 / (max - min episode return), as IQL."""
    if normalize_returns:
        returns = data.episode_returns()
        spread = float(returns.max() - returns.min())
        reward_scale *= 1000.0 / spread if spread > 0 else 1.0
    n = data.observations.shape[1]
    return {"obs_mean": data.observations.mean(0) if normalize_states else np.zeros(n, np.float32),
            "obs_std": data.observations.std(0) + 1e-3 if normalize_states else np.ones(n, np.float32),
            "reward_scale": float(reward_scale), "reward_bias": float(reward_bias)}
