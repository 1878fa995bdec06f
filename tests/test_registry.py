"""Task registry, evaluation envs and D4RL normalized scores."""

import os

import numpy as np
import pytest

from utils.common import UserError
from utils.tasks import ALIASES, TASKS, get_task, make_env, normalized_score

EXPECTED = (
    [f"antmaze-{m}" for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play",
                              "large-diverse")]
    + [f"{t}-{d}" for t in ("pen", "door", "hammer", "relocate") for d in ("human", "cloned", "expert")]
    + [f"{e}-{d}" for e in ("hopper", "halfcheetah", "walker2d") for d in ("simple", "medium", "expert")]
    + [f"pointmaze-{m}{s}" for m in ("umaze", "medium", "large") for s in ("", "-dense")]
)


def test_registry_has_exactly_the_requested_tasks():
    assert sorted(TASKS) == sorted(EXPECTED)


def test_aliases_and_suffixes():
    assert get_task("antmaze-large").name == "antmaze-large-diverse"
    assert get_task("antmaze-medium").name == "antmaze-medium-diverse"
    assert get_task("antmaze-large-diverse-v2").minari_id == "D4RL/antmaze/large-diverse-v1"
    assert get_task("Pen-Human").minari_id == "D4RL/pen/human-v2"
    assert get_task("hopper-medium").minari_id == "mujoco/hopper/medium-v0"
    assert get_task("pointmaze-umaze-dense").minari_id == "D4RL/pointmaze/umaze-dense-v2"
    assert set(ALIASES.values()) <= set(TASKS)


def test_typo_lists_valid_names():
    with pytest.raises(UserError) as e:
        get_task("antmaze-hugest")
    msg = str(e.value)
    assert "antmaze-large" in msg and "pointmaze-umaze" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "name, ret, expected",
    [
        ("antmaze-large", 1.0, 100.0),  # D4RL antmaze: min 0, max 1 -> 100 x success
        ("antmaze-umaze", 0.0, 0.0),
        ("hopper-medium", -20.272305, 0.0),
        ("hopper-medium", 3234.3, 100.0),
        ("hopper-medium", (3234.3 - 20.272305) / 2, 50.0),  # halfway between min and max
        ("pen-human", 96.262799 + 0.25 * (3076.8331017826877 - 96.262799), 25.0),
        ("pointmaze-umaze", 23.85 + 0.5 * (161.86 - 23.85), 50.0),
        ("pointmaze-large-dense", 303.4857382709002, 100.0),
    ],
)
def test_normalized_score_hand_values(name, ret, expected):
    assert normalized_score(get_task(name), ret) == pytest.approx(expected, abs=1e-9)


def test_every_task_env_builds_with_flat_obs():
    dims = {"antmaze": 29, "pointmaze": 6}
    for task in TASKS.values():
        env = make_env(task, seed=0)
        obs, _ = env.reset(seed=0)
        assert obs.dtype == np.float32 and obs.ndim == 1 and obs.shape == env.observation_space.shape
        if task.family in dims:
            assert obs.shape[0] == dims[task.family], task.name
        assert env.spec.max_episode_steps == task.max_episode_steps
        xml = getattr(env.unwrapped, "tmp_xml_file_path", None)  # gymnasium-robotics' mazes: removed once loaded
        assert (xml is not None) == (task.family in dims) and not (xml and os.path.exists(xml)), task.name
        env.step(env.action_space.sample())  # the model does not need the file
        env.close()


def test_antmaze_eval_env_ends_at_goal_with_reward_one():
    """D4RL's eval AntMaze terminates at the goal, so return = success and the score is 100 x success rate."""
    task = get_task("antmaze-umaze")
    env = make_env(task)
    goals = set()
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        inner = env.unwrapped
        goals.add(tuple(np.round(inner.maze.cell_xy_to_rowcol(inner.goal))))
        start_cell = tuple(inner.maze.cell_xy_to_rowcol(obs[:2]))
        assert start_cell == (3, 1)  # the fixed "r" cell: one end of the U
    assert goals == {(1, 1)}  # the fixed "g" cell: the other end
    # Teleport the ant onto the goal: one step must give reward 1, terminated, success.
    ant = inner.ant_env
    qpos, qvel = ant.data.qpos.copy(), ant.data.qvel.copy()
    qpos[:2] = inner.goal
    ant.set_state(qpos, qvel * 0)
    obs, r, terminated, truncated, info = env.step(np.zeros(8, dtype=np.float32))
    assert r == 1.0 and terminated and info["success"]
    assert normalized_score(task, r) == 100.0
    env.close()


def test_pointmaze_eval_env_fixed_goal_does_not_terminate():
    task = get_task("pointmaze-medium")
    env = make_env(task)
    cells = set()
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        cells.add(tuple(env.unwrapped.maze.cell_xy_to_rowcol(obs[4:6])))
    assert cells == {(6, 6)}  # D4RL maze2d-medium's goal cell
    inner = env.unwrapped
    inner.point_env.set_state(np.array([*inner.goal]), np.zeros(2))
    obs, r, terminated, truncated, info = env.step(np.zeros(2, dtype=np.float32))
    assert r == 1.0 and info["success"] and not terminated  # reward accumulates, as in maze2d
    env.close()


def test_eval_maps_keep_the_dataset_layouts():
    """The eval maps only mark start/goal cells: walls are exactly those of the envs the data was collected in."""
    import gymnasium as gym

    from utils.tasks import register_envs

    register_envs()
    for name in ("antmaze-umaze", "antmaze-medium-play", "antmaze-large-diverse", "pointmaze-umaze",
                 "pointmaze-medium", "pointmaze-large"):
        task = get_task(name)
        default = gym.spec(task.env_id).kwargs["maze_map"]
        walls = lambda mm: [[c == 1 for c in row] for row in mm]  # noqa: E731
        assert walls(task.env_kwargs["maze_map"]) == walls(default), name
