"""The benchmark studies (docs/results.md): their measurements against hand-computed references, and each study's
whole pipeline (driver -> runs -> extract -> tables and figures) at toy size."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_script

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import fidelity_study  # noqa: E402
import make_results  # noqa: E402

DOC = """# results
<!-- table:llm_main -->
old
<!-- /table:llm_main -->
<!-- table:llm_n1 -->
<!-- /table:llm_n1 -->
<!-- table:llm_speed -->
<!-- /table:llm_speed -->
<!-- table:edis -->
<!-- /table:edis -->
<!-- table:fidelity -->
<!-- /table:fidelity -->
"""


def test_mmd2_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=gen), torch.randn(5, 3, generator=gen) + 0.5
    k = lambda a, b: float(np.exp(-float(((a - b) ** 2).sum()) / (2 * 0.8 ** 2)))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert fidelity_study.mmd2(x, y, 0.8) == pytest.approx(xx + yy - 2 * xy, abs=1e-6)


def test_rounds_to_reach_and_mean_std():
    run = {"evals": [{"round": 0, "train_time_s": 0.0, "acc": 0.9},  # the start never counts
                     {"round": 10, "train_time_s": 5.0, "acc": 0.3}, {"round": 20, "train_time_s": 11.0, "acc": 0.6},
                     {"round": 30, "train_time_s": 16.0, "acc": 0.5}]}
    assert make_results.rounds_to_reach(run, 0.55, "acc") == (20, 11.0)
    assert make_results.rounds_to_reach(run, 0.95, "acc") is None
    assert make_results.ms([1.0, 2.0, 3.0], "{:.1f}") == "2.0 ± 1.0"  # sample std (n - 1)


def test_paired_test_against_textbook_critical_values():
    """Samples built to sit on printed two-sided critical values of Student's t (df = 2: 4.303 at 5 %, 9.925 at 1 %):
    three differences a - 1, a, a + 1 have sample std 1, so t = a * sqrt(3); at the 5 % value the 95 % interval of
    the mean, a -+ 4.303 / sqrt(3), just touches 0."""
    for t, p in ((4.303, "0.05"), (9.925, "0.01")):
        a = t / math.sqrt(3)
        lo, hi = a - 4.303 / math.sqrt(3), a + 4.303 / math.sqrt(3)
        assert make_results.paired([a - 1, a, a + 1]) == f"3/3 better, 95 % CI [{lo:.1f}, {hi:.1f}], p = {p}"
    assert "95 % CI [0.0, 5.0]" in make_results.paired([4.303 / math.sqrt(3) + d for d in (-1, 0, 1)])
    assert make_results.paired([1.0, -1.0]).endswith("p = 1.00")  # mean 0
    assert make_results.paired([2.0, 2.0]) == "2/2 better"  # no spread: no test
    a = 20.0 / math.sqrt(3)  # t = 20, df = 2: p = 0.0025 is written with its digits, not rounded to 0.00
    assert make_results.paired([a - 1, a, a + 1]) == "3/3 better, 95 % CI [9.1, 14.0], p = 2.5e-03"


def test_simulator_reproduces_real_transitions_and_finds_walls(tiny_pointmaze, monkeypatch):
    """The fidelity measurement itself: real transitions, replayed from their states, give ~0 dynamics error."""
    for k, v in tiny_pointmaze.items():
        monkeypatch.setenv(k, v)
    from utils.offline_data import load_offline_data
    from utils.tasks import get_task, make_env

    task = get_task("pointmaze-umaze")
    env, data = make_env(task, seed=0), load_offline_data(task)
    idx = np.random.default_rng(0).integers(0, len(data), 200)
    sim = fidelity_study.simulate(env, data.observations[idx], data.actions[idx])
    assert np.abs(data.next_observations[idx, :4] - sim).max() < 1e-5
    assert not np.allclose(data.observations[idx, :4], sim)  # and the states did move
    maze = env.unwrapped.maze
    free = [maze.cell_rowcol_to_xy(np.array([r, c])) for r, row in enumerate(maze.maze_map)
            for c, v in enumerate(row) if v != 1]
    walls = [maze.cell_rowcol_to_xy(np.array([r, c])) for r, row in enumerate(maze.maze_map)
             for c, v in enumerate(row) if v == 1]
    assert fidelity_study.wall_fraction(env, np.array(free)) == 0.0
    assert fidelity_study.wall_fraction(env, np.array(walls)) == 1.0
    assert fidelity_study.wall_fraction(env, np.array([[100.0, 0.0]])) == 1.0  # outside the maze counts as wall
    # distance to the nearest wall against brute force: the closest of a dense grid of points on every wall block
    scale = maze.maze_size_scaling
    u = np.linspace(-scale / 2, scale / 2, 201)
    grid = np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)
    wall_points = np.concatenate([np.asarray(w) + grid for w in walls])
    xy = np.array(free) + np.random.default_rng(1).uniform(-scale / 2, scale / 2, (len(free), 2))
    brute = np.array([np.linalg.norm(wall_points - p, axis=1).min() for p in xy])
    assert np.abs(fidelity_study.wall_distance(env, xy) - brute).max() < scale / 200
    assert (fidelity_study.wall_distance(env, np.array(walls)) == 0).all()
    assert fidelity_study.ball_radius(env) == pytest.approx(0.1)  # PointMaze's ball
    # the offline data's waypoint controller keeps the ball clear of the walls
    assert (fidelity_study.wall_distance(env, data.observations[idx, :2]) > fidelity_study.ball_radius(env)).all()


def fill_doc(tmp_path, runs):
    doc = tmp_path / "results.md"
    doc.write_text(DOC)
    make_results.main(["--runs", str(runs), "--results", str(tmp_path / "res"), "--doc", str(doc),
                       "--img", str(tmp_path / "img")])
    return doc.read_text()


def test_edis_and_fidelity_pipeline(tiny_pointmaze, tmp_path):
    runs = tmp_path / "runs"
    extra = ("--eval-episodes 1 --edis-diffusion-steps 40 --edis-num-samples 200 --edis-width 32 --edis-depth 2 "
             "--edis-sample-steps 4 --energy-pool 16 --energy-negatives 4 --energy-steps 3 --hidden-dim 32 "
             "--batch-size 32 --log-every 50 --device cpu")
    res = tmp_path / "res"
    study = ["benchmarks/edis_study.py", "--algos", "iql", "--seeds", "1", "--out", str(runs / "edis"), "--results",
             str(res / "edis_study"), "--offline-steps", "100", "--online-steps", "160", "--eval-every", "40",
             "--retrain-every", "70", "--eval-episodes", "1", f"--extra={extra}"]
    p = run_script(study + ["--arms", "noedis", "paper", "extras", "online_only"], tiny_pointmaze, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    base = runs / "edis" / "iql" / "seed1"
    arms = {a: json.loads((base / a / "summary.json").read_text()) for a in ("noedis", "paper", "extras",
                                                                              "online_only")}
    assert arms["noedis"]["edis_retrains"] == 0 and arms["paper"]["edis_retrains"] == 2  # at online steps 70, 140
    assert not arms["paper"]["edis_extras"] and arms["extras"]["edis_extras"]
    assert len({a["offline_normalized_score"] for a in arms.values()}) == 1  # one shared offline phase
    assert all(a["updates"] == 100 + 160 and a["online_env_steps"] == 160 for a in arms.values())
    records = {a: json.loads((res / "edis_study" / f"iql-seed1-{a}.json").read_text()) for a in arms}
    for a, rec in records.items():  # each finished run extracted at once, with its commit and config
        assert rec["arm"] == a and rec["final_score"] == arms[a]["final_normalized_score"] and rec["commit"]
        assert rec["evals"][-1]["step"] == 260 and len(rec["evals"]) >= 3 and rec["config"]["seed"] == 1
    offline = json.loads((res / "edis_study" / "iql-seed1-offline.json").read_text())
    assert len(offline["weights_sha256"]) == 64
    p = run_script(study, tiny_pointmaze)
    assert p.returncode == 0 and p.stdout.count("results committed, skipped") == 4, p.stdout  # nothing reruns
    p = run_script(["benchmarks/iql_success.py", "--runs", str(runs / "edis" / "iql"), "--episodes", "2", "--out",
                    str(tmp_path / "res_success.json")], tiny_pointmaze, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    success = {r["arm"]: r for r in json.loads((tmp_path / "res_success.json").read_text())["runs"]}
    assert set(success) == {"noedis", "paper", "extras", "online_only"}
    for r in success.values():
        assert 0 <= r["final_stochastic_success"] <= 1 and len(r["actor_std"]) == 2
    p = run_script(["benchmarks/fidelity_study.py", "--algo", "iql", "--seeds", "1", "--runs", str(runs / "edis"),
                    "--samples", "64", "--held-out", "40", "--energy-steps", "3", "--out", str(runs / "fidelity"),
                    "--overrides", "edis_diffusion_steps=40"], tiny_pointmaze, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = {r["set"]: r for r in json.loads((runs / "fidelity" / "iql_seed1.json").read_text())["rows"]}
    assert rows["offline (real)"]["dynamics_error_mean"] < 1e-5 and rows["online (real, held out)"][
        "dynamics_error_mean"] < 1e-5
    assert rows["paper: unguided"]["dynamics_error_mean"] > 1e-3  # a 40-step denoiser
    for form in ("paper", "extras"):  # both forms, unguided and guided, and the conditional sampler
        for name in (f"{form}: unguided", f"{form}: guided", f"{form}: (r, s', d) given real (s, a), conditional "
                     "sampler"):
            assert rows[name]["dynamics_error_mean"] > 0, name
            assert 0 <= rows[name]["states_overlapping_walls"] <= rows[name]["states_touching_walls"] <= 1
    doc = tmp_path / "results.md"
    doc.write_text(DOC + "<!-- table:iql_success -->\n<!-- /table:iql_success -->\n")
    shutil.copy(tmp_path / "res_success.json", tmp_path / "iql_success.json")
    os.makedirs(tmp_path / "res", exist_ok=True)
    shutil.copy(tmp_path / "res_success.json", tmp_path / "res" / "iql_success.json")
    make_results.main(["--runs", str(runs), "--results", str(tmp_path / "res"), "--doc", str(doc),
                       "--img", str(tmp_path / "img")])
    text = doc.read_text()
    assert "| IQL | EDIS as the paper | 1 |" in text and "| IQL | EDIS + --edis-extras | 1 |" in text
    assert "| paper: guided |" in text and "| online only: EDIS's batches without synthetic rows | 1 |" in text
    assert (tmp_path / "img" / "edis_curves.png").stat().st_size > 1000
    for bad, text in (("edis_diffusion_steps=abc", "'abc' is not a int"), ("no_such_flag=1", "not a number")):
        p = run_script(["benchmarks/fidelity_study.py", "--seeds", "1", "--runs", str(runs / "edis"), "--overrides",
                        bad, "--out", str(tmp_path / "bad")], tiny_pointmaze)
        assert p.returncode == 1 and text in p.stderr and "Traceback" not in p.stderr, p.stderr[-500:]
    # settings of the same seeds in sub-folders: one table, each set prefixed by its folder's name, real rows once
    fid = runs / "fidelity"
    for sub in ("denoiser_40_steps", "denoiser_80_steps"):
        (fid / sub).mkdir()
        shutil.copy(fid / "iql_seed1.json", fid / sub / "iql_seed1.json")
    (fid / "iql_seed1.json").unlink()
    make_results.main(["extract", "--runs", str(runs), "--results", str(tmp_path / "res")])
    merged = json.loads((tmp_path / "res" / "fidelity_study.json").read_text())["seeds"]
    names = [r["set"] for r in merged[0]["rows"]]
    assert len(merged) == 1 and names.count("offline (real)") == 1 and len(names) == 2 * len(rows) - 2
    assert "denoiser 80 steps: paper: unguided" in names

    # runs/ is not committed: a fresh checkout recomputes the offline phase, checks it bit for bit and runs only
    # what has no results file
    shutil.rmtree(runs / "edis" / "iql")
    (res / "edis_study" / "iql-seed1-noedis.json").unlink()
    p = run_script(study, tiny_pointmaze, timeout=600)
    assert p.returncode == 0 and "weights equal to the recorded ones bit for bit" in p.stdout, p.stdout + p.stderr
    assert p.stdout.count("results committed, skipped") == 3 and (res / "edis_study" / "iql-seed1-noedis.json").exists()
    assert not (runs / "edis" / "iql" / "seed1" / "paper").exists()
    shutil.rmtree(runs / "edis" / "iql")
    (res / "edis_study" / "iql-seed1-noedis.json").unlink()
    (res / "edis_study" / "iql-seed1-offline.json").write_text(json.dumps(dict(offline, weights_sha256="0" * 64)))
    p = run_script(study, tiny_pointmaze, timeout=600)
    assert p.returncode == 1 and "differs from the one recorded" in p.stderr and "Traceback" not in p.stderr


def test_llm_pipeline(tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    p = run_script(["benchmarks/llm_study.py", "--seeds", "1", "--rounds", "2", "--eval-every", "1",
                    "--eval-prompts", "4", "--eval-samples", "2", "--out", str(runs / "llm"),
                    f"--extra=--model {tiny_model_dir} --max-new-tokens 10 --device cpu"], timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    manifest = json.loads((runs / "llm" / "manifest.json").read_text())
    assert set(manifest["runs"]) == {"main/grpo/seed1", "main/reval_k1/seed1", "main/reval_k2/seed1",
                                     "main/reval_k4/seed1", "n1/grpo/seed1", "n1/reval_k8/seed1"}
    s = json.loads((runs / "llm" / "main" / "reval_k4" / "seed1" / "summary.json").read_text())
    assert s["rounds"] == 2 and s["updates"] == 2 * 4 and s["replay_updates"] == 2 * 3  # K = 4: 1 fresh + 3 replayed
    text = fill_doc(tmp_path, runs)
    assert "| GRPO | 1 |" in text and "| ReVal K=8 | 1 |" in text and "old" not in text
    assert (tmp_path / "img" / "llm_main.png").exists() and (tmp_path / "img" / "llm_n1.png").exists()


def test_llm_tuning_pipeline(tiny_model_dir, tmp_path, monkeypatch):
    """The tuning protocol end to end at toy size (2 configurations per method): tuning runs are scored on the
    validation split, the selection is the argmax of the validation scores, and the final, 1-rollout and beta runs use
    the selected configurations on the eval split."""
    import llm_tuning

    grid = {"grpo": [{"learning-rate": 5e-5, "loss-type": "grpo"}, {"learning-rate": 1e-4, "loss-type": "dapo"}],
            "reval": [dict(llm_tuning.REVAL_BASE), dict(llm_tuning.REVAL_BASE, beta=0.3)]}
    monkeypatch.setattr(llm_tuning, "tune_grid", lambda: grid)
    monkeypatch.setattr(llm_tuning, "n1_grid", lambda best: {m: [dict(c, **{"learning-rate": 2e-5})]
                                                             for m, c in best.items()})
    runs = tmp_path / "runs"
    out = runs / "llm_tuning"
    monkeypatch.setattr(sys, "argv", ["benchmarks/llm_tuning.py"])
    llm_tuning.main(llm_tuning.Cli(seeds=(1,), betas=(1.0,), rounds=3, eval_every=1, eval_prompts=4,
                                   eval_samples=2, out=str(out),
                                   extra=f"--model {tiny_model_dir} --max-new-tokens 8 --device cpu"))
    sel = json.loads((out / "tune" / "selection.json").read_text())
    for method, cfgs in grid.items():
        scores = sel[method]["scores"]
        assert set(scores) == {llm_tuning.name_of(c) for c in cfgs}
        for c in cfgs:  # the score: mean sampled accuracy of the last three evaluations, from the run's own log
            evals = make_results.scalars(str(out / "tune" / method / llm_tuning.name_of(c) / "seed11"))
            assert scores[llm_tuning.name_of(c)] == pytest.approx(
                np.mean([v for _, v in evals["eval/accuracy_sampled"][-3:]]))
        best = max(cfgs, key=lambda c: scores[llm_tuning.name_of(c)])
        assert sel[method]["best"] == best
        tuned = json.loads((out / "final" / method / llm_tuning.name_of(best) / "seed1" / "config.json").read_text())
        assert tuned["eval_split"] == "test" and tuned["learning_rate"] == best["learning-rate"]
        tuning = json.loads((out / "tune" / method / llm_tuning.name_of(best) / "seed11" / "config.json").read_text())
        assert tuning["eval_split"] == "validation" and tuning["total_rounds"] == 3
    assert (out / "n1-final" / "reval").is_dir() and (out / "n1-tune" / "selection.json").exists()
    best = sel["reval"]["best"]
    assert {p.name for p in (out / "beta" / "reval").iterdir() if p.is_dir()} == {
        llm_tuning.name_of(dict(best, beta=1.0))}  # neither configuration of the grid has beta 1
    text = (tmp_path / "doc.md")
    text.write_text("<!-- table:llm_tune -->\n<!-- /table:llm_tune -->\n<!-- table:llm_tuned_main -->\n"
                    "<!-- /table:llm_tuned_main -->\n<!-- table:llm_beta -->\n<!-- /table:llm_beta -->\n")
    make_results.main(["--runs", str(runs), "--results", str(tmp_path / "res"), "--doc", str(text),
                       "--img", str(tmp_path / "img")])
    doc = text.read_text()
    assert doc.count("**yes**") == 4 and "| GRPO (lr" in doc and "| 1 |" in doc
    assert (tmp_path / "img" / "llm_tuned_main.png").exists() and (tmp_path / "img" / "llm_beta.png").exists()


def test_flop_count_of_one_update_against_a_hand_count():
    """peer_corl.py --flops counts an update's matrix products: a linear layer's forward and weight gradient on
    B rows are 2 x (2 B in out) FLOPs (the input needs no gradient), its bias none; the first call is not counted."""
    import peer_corl

    torch.manual_seed(0)
    lin, x = torch.nn.Linear(29, 256), torch.randn(64, 29)
    step = lambda i: lin(x).pow(2).sum().backward()  # noqa: E731
    assert peer_corl.gflop_per_update(step) * 1e9 == 2 * (2 * 64 * 29 * 256)


@pytest.mark.parametrize("script, flag, fetch", [("peer_corl.py", "--corl", "github:corl-team/CORL"),
                                                 ("peer_edis_sampler.py", "--official", "github:liuxhym/EDIS")])
def test_peer_benchmark_without_the_peer_copy_is_one_line(script, flag, fetch, tmp_path):
    p = run_script([os.path.join("benchmarks", script), flag, str(tmp_path)])
    assert p.returncode == 1 and fetch in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-500:]
