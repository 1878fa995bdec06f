"""Dataset loaders: Minari datasets built here from the real envs (PointMaze, AntMaze, Hopper) and tiny D4RL-layout
hdf5 files, each checked against a slow, obviously-correct reference loop."""

import os
import time

import gymnasium as gym
import h5py
import numpy as np
import pytest

from tests.conftest import run_script
from utils.collect import collect_pointmaze, rollout, write_minari_dataset
from utils.common import UserError
from utils.offline_data import load_d4rl_hdf5, load_offline_data
from utils.tasks import get_task, make_env, minari_dataset_dir, register_envs


# ----------------------------------------------------------------------------------------------------------------
# Slow references
# ----------------------------------------------------------------------------------------------------------------
def reference_from_minari_file(dataset_id, obs_keys):
    """Read main_data.hdf5 with h5py alone, one transition at a time."""
    path = os.path.join(minari_dataset_dir(dataset_id), "data", "main_data.hdf5")
    rows = {k: [] for k in ("obs", "act", "rew", "nobs", "term", "tout", "end")}
    with h5py.File(path, "r") as f:
        for name in sorted(f.keys(), key=lambda n: int(n.split("_")[1])):
            ep = f[name]
            T = len(ep["rewards"])
            o = ep["observations"]
            get = (lambda t: np.concatenate([o[k][t] for k in obs_keys])) if obs_keys else (lambda t: o[t])
            for t in range(T):
                rows["obs"].append(get(t))
                rows["nobs"].append(get(t + 1))
                rows["act"].append(ep["actions"][t])
                rows["rew"].append(ep["rewards"][t])
                rows["term"].append(float(ep["terminations"][t]))
                rows["tout"].append(float(ep["truncations"][t]))
                rows["end"].append(t == T - 1)
    return {k: np.array(v) for k, v in rows.items()}


def reference_from_d4rl(obs, act, rew, term, tout, nobs=None):
    """The d4rl.qlearning_dataset rules written as a loop, with the no-stitching fix for terminal steps."""
    n = len(obs)
    episode, ep = [], 0
    for i in range(n):  # episode index of every row: a new episode starts after a terminal or a timeout
        episode.append(ep)
        ep += bool(term[i] or tout[i])
    out = {k: [] for k in ("obs", "act", "rew", "nobs", "term", "tout", "ep")}
    for i in range(n):
        last = i == n - 1 or episode[i + 1] != episode[i]
        if nobs is not None:
            nxt = nobs[i]
        elif not last:
            nxt = obs[i + 1]
        elif term[i]:
            nxt = obs[i]  # placeholder, never bootstrapped
        else:
            continue  # timed-out (or file-final) step without a stored next observation: dropped
        for k, v in (("obs", obs[i]), ("act", act[i]), ("rew", rew[i]), ("nobs", nxt), ("term", float(term[i])),
                     ("tout", float(tout[i])), ("ep", episode[i])):
            out[k].append(v)
    eps = out.pop("ep")
    out["end"] = [j == len(eps) - 1 or eps[j + 1] != eps[j] for j in range(len(eps))]
    return {k: np.array(v) for k, v in out.items()}


def assert_matches(data, ref):
    np.testing.assert_allclose(data.observations, ref["obs"].astype(np.float32))
    np.testing.assert_allclose(data.next_observations, ref["nobs"].astype(np.float32))
    np.testing.assert_allclose(data.actions, ref["act"].astype(np.float32).reshape(len(data), -1))
    np.testing.assert_allclose(data.rewards, ref["rew"].astype(np.float32))
    np.testing.assert_array_equal(data.terminals, ref["term"])
    np.testing.assert_array_equal(data.timeouts, ref["tout"])
    np.testing.assert_array_equal(data.episode_ends, ref["end"])
    assert data.observations.dtype == np.float32 and data.rewards.dtype == np.float32


def assert_no_stitching(data):
    """Inside an episode, next_obs[i] == obs[i+1]; across an episode end this must not be assumed."""
    inner = ~data.episode_ends[:-1]
    np.testing.assert_array_equal(data.next_observations[:-1][inner], data.observations[1:][inner])


# ----------------------------------------------------------------------------------------------------------------
# Minari datasets made from the real envs
# ----------------------------------------------------------------------------------------------------------------
def test_pointmaze_collect_roundtrip(minari_cache):
    task = get_task("pointmaze-umaze")
    collect_pointmaze(task, num_steps=3000, seed=0, progress=False, log=lambda s: None)
    data = load_offline_data(task, log=lambda s: None)
    assert len(data) == 3000 and data.observations.shape == (3000, 6)
    assert_matches(data, reference_from_minari_file(task.local_minari_id, task.obs_keys))
    assert_no_stitching(data)
    assert data.terminals.sum() == 0  # continuing task: no true terminations, only truncations
    assert data.timeouts.sum() == data.num_episodes
    # The flat observation of the eval env is built by the same code: same size and the same key order.
    obs, _ = make_env(task).reset(seed=0)
    raw, _ = gym.make(task.env_id, **task.env_kwargs).reset(seed=0)
    np.testing.assert_array_equal(obs, np.concatenate([raw["observation"], raw["desired_goal"]]).astype(np.float32))


def test_antmaze_minari_roundtrip(minari_cache):
    """A tiny AntMaze dataset from the real env, saved under the official id, loads like the download would."""
    task = get_task("antmaze-umaze")
    register_envs()
    env = gym.make("AntMaze_UMaze-v4", continuing_task=True, reset_target=False, max_episode_steps=1000)
    env.action_space.seed(0)
    episodes = [rollout(env, lambda o: env.action_space.sample(), max_steps=40 + 10 * i, seed=i) for i in range(3)]
    write_minari_dataset(task.minari_id, episodes, env=env, algorithm_name="random")
    data = load_offline_data(task)
    assert data.observations.shape == (40 + 50 + 60, 29)
    assert_matches(data, reference_from_minari_file(task.minari_id, task.obs_keys))
    assert_no_stitching(data)
    # D4RL layout: [x, y, 13 qpos, 14 qvel]; x, y is the achieved goal.
    first = episodes[0].observations[0]
    np.testing.assert_allclose(data.observations[0, :2], first["achieved_goal"].astype(np.float32))
    np.testing.assert_allclose(data.observations[0, 2:], first["observation"].astype(np.float32))
    assert data.timeouts.sum() == 3 and data.terminals.sum() == 0


def test_hopper_minari_terminals_and_timeouts_distinct(minari_cache):
    """Hopper falls (true termination) under random actions; a step cap gives truncations. Both must survive."""
    task = get_task("hopper-medium")
    env = gym.make("Hopper-v5")
    env.action_space.seed(0)
    rng = np.random.default_rng(0)
    episodes = [rollout(env, lambda o: rng.uniform(-1, 1, 3).astype(np.float32), max_steps=cap, seed=i)
                for i, cap in enumerate([200, 200, 5, 200, 4])]
    write_minari_dataset(task.minari_id, episodes, env=env, algorithm_name="random")
    data = load_offline_data(task)
    ref = reference_from_minari_file(task.minari_id, None)
    assert_matches(data, ref)
    assert_no_stitching(data)
    assert data.terminals.sum() >= 1 and data.timeouts.sum() >= 2
    assert not np.any(data.terminals.astype(bool) & data.timeouts.astype(bool))
    # episode returns from the flat arrays equal the per-episode sums
    np.testing.assert_allclose(data.episode_returns(), [sum(ep.rewards) for ep in episodes], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# D4RL-layout hdf5
# ----------------------------------------------------------------------------------------------------------------
def write_d4rl(path, obs, act, rew, term, tout=None, nobs=None, reward_shape=(-1,)):
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["actions"] = act
        f["rewards"] = rew.reshape(reward_shape)
        f["terminals"] = term.reshape(reward_shape)
        if tout is not None:
            f["timeouts"] = tout
        if nobs is not None:
            f["next_observations"] = nobs
        f["infos/qpos"] = np.zeros((len(obs), 2))  # extra keys are ignored


def test_d4rl_hdf5_hand_example(tmp_path):
    # ep A: rows 0-3, ends by timeout at 3; ep B: rows 4-6, terminal at 6; ep C: rows 7-8, file end, no flag.
    obs = np.arange(9, dtype=np.float64)[:, None] * np.ones((1, 3))
    act = np.arange(9, dtype=np.float32)[:, None]
    rew = np.arange(9, dtype=np.float32)
    term = np.zeros(9, bool)
    term[6] = True
    tout = np.zeros(9, bool)
    tout[3] = True
    path = tmp_path / "d.hdf5"
    write_d4rl(path, obs, act, rew, term, tout, reward_shape=(-1, 1))
    d = load_d4rl_hdf5(str(path))
    # kept rows: 0,1,2 (A without its timed-out last step), 4,5,6 (B, terminal kept), 7 (C without its last step)
    np.testing.assert_array_equal(d.observations[:, 0], [0, 1, 2, 4, 5, 6, 7])
    np.testing.assert_array_equal(d.next_observations[:, 0], [1, 2, 3, 5, 6, 6, 8])  # 6 -> 6: terminal placeholder
    np.testing.assert_array_equal(d.terminals, [0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(d.timeouts, [0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(d.episode_ends, [0, 0, 1, 0, 0, 1, 1])
    assert d.num_episodes == 3


@pytest.mark.parametrize("with_next_obs", [False, True])
def test_d4rl_hdf5_random_flags_match_reference(tmp_path, with_next_obs):
    rng = np.random.default_rng(1)
    n = 300
    obs = rng.normal(size=(n, 4))
    act = rng.normal(size=(n, 2)).astype(np.float32)
    rew = rng.normal(size=n).astype(np.float32)
    term = rng.random(n) < 0.03
    tout = (rng.random(n) < 0.03) & ~term
    nobs = rng.normal(size=(n, 4)) if with_next_obs else None
    path = tmp_path / "d.hdf5"
    write_d4rl(path, obs, act, rew, term, tout, nobs=nobs)
    d = load_d4rl_hdf5(str(path))
    assert_matches(d, reference_from_d4rl(obs, act, rew, term, tout, nobs))
    if not with_next_obs:
        assert_no_stitching(d)


def test_d4rl_hdf5_through_dataset_path_checks_shapes(tmp_path, minari_cache):
    task = get_task("antmaze-umaze")
    n = 20
    good = tmp_path / "ant.hdf5"
    write_d4rl(good, np.zeros((n, 29)), np.zeros((n, 8)), np.zeros(n), np.zeros(n, bool), np.eye(1, n, n - 1)[0] > 0)
    d = load_offline_data(task, dataset_path=str(good))
    assert len(d) == n - 1 and d.source.startswith("D4RL hdf5")
    bad = tmp_path / "bad.hdf5"
    write_d4rl(bad, np.zeros((n, 5)), np.zeros((n, 8)), np.zeros(n), np.zeros(n, bool))
    with pytest.raises(UserError, match="do not match --env antmaze-umaze"):
        load_offline_data(task, dataset_path=str(bad))
    with pytest.raises(UserError, match="does not exist"):
        load_offline_data(task, dataset_path=str(tmp_path / "nope.hdf5"))
    notd4rl = tmp_path / "x.hdf5"
    with h5py.File(notd4rl, "w") as f:
        f["foo"] = np.zeros(3)
    with pytest.raises(UserError, match="missing observations"):
        load_offline_data(task, dataset_path=str(notd4rl))


# ----------------------------------------------------------------------------------------------------------------
# Missing data and bad names: one line, non-zero exit, fast
# ----------------------------------------------------------------------------------------------------------------
def test_missing_antmaze_fails_fast_offline(tmp_path):
    t0 = time.time()
    p = run_script(["edis_iql.py", "--env", "antmaze-umaze"],
                   {"MINARI_DATASETS_PATH": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert time.time() - t0 < 30
    assert p.returncode == 2
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "D4RL/antmaze/umaze-v1" in err and str(tmp_path) in err and "minari download" in err


def test_missing_dataset_without_network(minari_cache, monkeypatch):
    import utils.offline_data as od

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(od, "network_available", lambda host, timeout=3.0: False)
    with pytest.raises(UserError, match="no network connection to huggingface.co") as e:
        load_offline_data(get_task("door-human"))
    assert "D4RL/door/human-v2" in str(e.value)


def test_missing_hf_extra_is_named(minari_cache, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "huggingface_hub":
            raise ImportError("no module")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match=r'minari\[hf\]'):
        load_offline_data(get_task("pen-human"))


def test_download_path_reaches_minari_and_fails_cleanly(tmp_path):
    """Pretend the network check passed: the real minari.download_dataset runs up to the network call
    (refused by HF_HUB_OFFLINE in huggingface_hub) and the failure becomes a one-line error, nothing cached."""
    code = (
        "import utils.offline_data as od; from utils.common import run_cli;"
        "od.why_no_download = lambda: None;"
        "from utils.tasks import get_task; run_cli(lambda: od.load_offline_data(get_task('antmaze-large')))"
    )
    p = run_script(["-c", code], {"MINARI_DATASETS_PATH": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2, p.stderr
    assert "downloading Minari dataset D4RL/antmaze/large-diverse-v1 failed" in p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "D4RL" / "antmaze" / "large-diverse-v1" / "data")


def test_typo_env_one_line_error():
    p = run_script(["edis_iql.py", "--env", "antmaze-hugest"])
    assert p.returncode == 2
    assert "antmaze-large" in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_pointmaze_missing_offline_is_collected_and_logged(minari_cache):
    task = get_task("pointmaze-umaze")
    logs = []
    data = load_offline_data(task, collect_steps=1500, log=logs.append)
    assert len(data) == 1500 and task.local_minari_id in data.source
    assert any("collecting the local stand-in" in m and task.minari_id in m for m in logs)
    logs.clear()
    load_offline_data(task, log=logs.append)  # second time: the cached local copy, no new collection
    assert any("using the locally collected dataset" in m for m in logs)
    assert not any("collecting" in m for m in logs)


# ----------------------------------------------------------------------------------------------------------------
# The collector
# ----------------------------------------------------------------------------------------------------------------
def test_bfs_next_cell_on_umaze():
    from utils.collect import bfs_next_cell

    umaze = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    nxt = bfs_next_cell(umaze, (3, 1))
    path, cell = [(1, 1)], (1, 1)
    while cell != (3, 1):
        cell = nxt[cell]
        path.append(cell)
    assert path == [(1, 1), (1, 2), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1)]  # around the U, the only way
    assert len(nxt) == 7  # every free cell, and no wall cell


def test_collector_reaches_goals_more_often_than_random():
    from utils.collect import collect_pointmaze_episodes

    task = get_task("pointmaze-medium")
    steps = 4000
    episodes, env = collect_pointmaze_episodes(task, steps, seed=0)
    controller_goals = sum(bool(ep.infos[-1]["success"]) for ep in episodes)
    env.close()
    env = gym.make(task.env_id, continuing_task=True, reset_target=True, max_episode_steps=steps + 1)
    env.action_space.seed(0)
    env.reset(seed=0)
    random_goals = sum(bool(env.step(env.action_space.sample())[4]["success"]) for _ in range(steps))
    assert sum(len(ep.actions) for ep in episodes) == steps
    assert controller_goals >= 10 and controller_goals > 5 * max(random_goals, 1)


def test_collect_cli_writes_loadable_dataset(tmp_path):
    env = {"MINARI_DATASETS_PATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    p = run_script(["-m", "utils.collect", "pointmaze-large", "--num-steps", "2000", "--seed", "3"], env)
    assert p.returncode == 0, p.stderr
    assert "wrote local/pointmaze/large-v0" in p.stdout
    assert (tmp_path / "local" / "pointmaze" / "large-v0" / "data" / "main_data.hdf5").exists()
    code = ("import minari; d = minari.load_dataset('local/pointmaze/large-v0');"
            "print(d.total_steps, d.recover_environment(eval_env=True).spec.max_episode_steps)")
    q = run_script(["-c", code], env)
    assert q.returncode == 0, q.stderr
    assert q.stdout.split() == ["2000", "800"]
    again = run_script(["-m", "utils.collect", "pointmaze-large", "--num-steps", "100"], env)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    bad = run_script(["-m", "utils.collect", "antmaze-umaze"], env)
    assert bad.returncode == 2 and "pointmaze" in bad.stderr and "Traceback" not in bad.stderr
