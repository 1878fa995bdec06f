"""What a CleanRL / CORL user expects to see: videos of the agent, a learning-curve PNG in every run folder, an
evaluation-only entry, readable files, a warning when a short run would silently do no EDIS, and the paper presets
starting after the README's install alone (offline here, so they must fail fast with one line)."""

import json
import os
import stat
import time

import pytest

from tests.conftest import run_script

EDIS_TINY = ["--env", "pointmaze-umaze", "--offline-steps", "200", "--online-steps", "700", "--eval-every", "300",
             "--eval-episodes", "1", "--edis-retrain-every", "300", "--edis-diffusion-steps", "40",
             "--edis-num-samples", "300", "--edis-width", "32", "--edis-depth", "2", "--edis-sample-steps", "4",
             "--energy-pool", "16", "--energy-negatives", "4", "--energy-steps", "4", "--log-every", "50",
             "--checkpoint-every", "100", "--hidden-dim", "32", "--batch-size", "32", "--device", "cpu"]
LLM_TINY = ["--total-rounds", "3", "--prompts-per-round", "4", "--group-size", "4", "--max-new-tokens", "12",
            "--eval-prompts", "8", "--eval-samples", "2", "--eval-every", "2", "--micro-batch-size", "8",
            "--device", "cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


def readable_by_others(path) -> bool:
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def test_edis_video_curve_and_eval_only(tiny_pointmaze, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "run"
    env = {k: v for k, v in tiny_pointmaze.items()}
    flags = [*EDIS_TINY, "--online-steps", "100"]  # evaluations at 200 (offline) and 300 (the end)
    p = run_script(["edis_iql.py", *flags, "--capture-video", "--output-dir", str(out)], env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    videos = sorted((out / "videos").rglob("*.mp4"))
    assert [v.parent.name for v in videos] == ["step200", "step300"]  # one per evaluation
    frames = iio.imread(videos[-1])
    assert frames.ndim == 4 and len(frames) > 10 and frames.std() > 10  # rendered without a display: a real image
    assert (out / "learning_curve.png").read_bytes()[:8] == PNG
    for f in ("config.json", "summary.json", "checkpoint.pt", "learning_curve.png"):
        assert readable_by_others(out / f), f  # the user's umask, not mkstemp's 0600
    # evaluation only: the checkpoint's deterministic policy scores what the run's final evaluation scored
    p = run_script(["edis_iql.py", "--resume", str(out), "--eval-only", "--capture-video"], env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert res["step"] == 300 and res["eval/normalized_score"] == summary["final_normalized_score"]
    assert list((out / "videos" / "eval-only-step300").glob("*.mp4"))
    p = run_script(["edis_iql.py", "--eval-only"], env)
    assert p.returncode == 2 and "--eval-only evaluates a checkpoint" in p.stderr


def test_short_edis_run_warns_that_no_retrain_will_happen(tiny_pointmaze, tmp_path):
    flags = [f for f in EDIS_TINY]
    flags[flags.index("--online-steps") + 1] = "250"  # the first retrain needs 300 online steps
    p = run_script(["edis_calql.py", *flags, "--q-layers", "2", "--cql-n-actions", "4", "--output-dir",
                    str(tmp_path / "r")], tiny_pointmaze, timeout=600)
    assert p.returncode == 0 and "leaves no EDIS retrain" in p.stderr, p.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["edis_retrains"] == 0


@pytest.mark.parametrize("script", ["grpo_llm.py", "reval_llm.py"])
def test_llm_curve_summary_and_eval_only(script, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1"}
    p = run_script([script, "--model", tiny_model_dir, *LLM_TINY, "--output-dir", str(out)], env)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial_eval_accuracy_sampled"] is not None and "sampled mean@2" in p.stdout.splitlines()[-1]
    assert (out / "learning_curve.png").read_bytes()[:8] == PNG
    assert json.loads((out / "config.json").read_text())["device_used"] == "cpu"
    for f in ("config.json", "summary.json", "checkpoint", "checkpoint/trainer_state.pt", "learning_curve.png"):
        assert readable_by_others(out / f), f
    # evaluation only: its own seeded sampling reproduces the run's final evaluation exactly
    p = run_script([script, "--resume", str(out), "--eval-only"], env)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "eval.json").read_text())
    assert res["round"] == 3 and res["eval/accuracy"] == summary["final_eval_accuracy"]
    assert res["eval/accuracy_sampled"] == summary["final_eval_accuracy_sampled"]


@pytest.mark.parametrize("argv, text", [
    (["reval_llm.py", "--preset", "paper-1.5b"], "cannot load dataset 'agentica-org/DeepScaleR-Preview-Dataset'"),
    (["edis_iql.py", "--env", "antmaze-large"], "D4RL/antmaze/large-diverse-v1"),
])
def test_headline_commands_fail_fast_offline(argv, text, tmp_path):
    """On a connected machine these download (minari[hf], datasets are requirements); offline, one line in seconds,
    also without HF_HUB_OFFLINE."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",)}
    env["MINARI_DATASETS_PATH"] = str(tmp_path / "minari")
    t0 = time.time()
    import subprocess
    import sys

    from tests.conftest import REPO

    p = subprocess.run([sys.executable, *argv, "--output-dir", str(tmp_path / "r")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and text in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert time.time() - t0 < 30 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("script", ["edis_iql.py", "edis_calql.py", "grpo_llm.py", "reval_llm.py"])
def test_each_script_works_alone_with_the_utils_its_header_lists(script, tmp_path):
    """A researcher copies one file plus the utils/ files named in its header into an empty folder: it runs."""
    import re
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    header = open(os.path.join(REPO, script)).read().split("from __future__")[0]
    needed = re.findall(r"utils/\w+\.py", header)
    assert "utils/common.py" in needed and "utils/__init__.py" in needed
    (tmp_path / "utils").mkdir()
    for f in [script, *needed]:
        shutil.copy(os.path.join(REPO, f), tmp_path / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--seed" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("script", ["edis_iql.py", "edis_calql.py", "grpo_llm.py", "reval_llm.py"])
def test_every_flag_has_a_one_line_help(script):
    """tyro prints a docstring's source line breaks as they are, so a wrapped docstring breaks --help mid-sentence."""
    import ast

    from tests.conftest import REPO

    tree = ast.parse(open(os.path.join(REPO, script)).read())
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    fields, docs = [], {}
    for prev, st in zip(args.body, args.body[1:]):
        if isinstance(prev, ast.AnnAssign):
            fields.append(prev.target.id)
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                docs[prev.target.id] = st.value.value
    assert set(fields) == set(docs), f"flags without a docstring: {set(fields) - set(docs)}"
    assert [k for k, v in docs.items() if "\n" in v] == []
