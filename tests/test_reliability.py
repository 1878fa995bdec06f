"""What a careless or adversarial user can do to the four scripts: every bad input is one line and exit status 2
before anything slow runs; checkpoints never execute code; diverged runs stop; runs and caches are never clobbered;
a killed run resumes to the same result; evaluation prompts are never trained on.

The bad-input sweep is a table (script, flags, expected message): add a row with every new flag."""

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import edis_calql
import edis_iql
import grpo_llm
import reval_llm
from tests.conftest import REPO, read_scalars, run_and_kill, run_script
from utils.common import run_cli

EDIS = {"edis_iql.py": edis_iql, "edis_calql.py": edis_calql}
LLM = {"grpo_llm.py": grpo_llm, "reval_llm.py": reval_llm}


def run_inprocess(module, argv, capsys):
    """``python <script> argv`` without a new interpreter: (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: module.main(argv))
    return e.value.code, capsys.readouterr().err


def assert_one_line_error(module, argv, text, capsys, cwd):
    """Exit status 2, one line holding ``text``, and no run folder left behind in ``cwd``."""
    code, err = run_inprocess(module, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and text in err, err
    assert not (cwd / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# Malformed files the sweep points at
# ---------------------------------------------------------------------------------------------------------------
def write_hdf5(path, n=50, obs_dim=4, act_dim=2, **override):
    rng = np.random.default_rng(0)
    arrays = {"observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
              "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
              "rewards": np.zeros(n, np.float32), "terminals": np.zeros(n, bool),
              "timeouts": (np.arange(n) % 25 == 24)}
    arrays.update(override)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if isinstance(v, str) and v == "group":
                f.create_group(k)
            elif v is not None:
                f.create_dataset(k, data=v)
    return str(path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    nan_obs = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    nan_obs[7, 2] = np.nan
    files = {
        "misaligned_actions": write_hdf5(d / "misaligned.hdf5", actions=np.zeros((25, 4), np.float32)),
        "short_rewards": write_hdf5(d / "short_rewards.hdf5", rewards=np.zeros(49, np.float32)),
        "short_terminals": write_hdf5(d / "short_terminals.hdf5", terminals=np.zeros(10, bool)),
        "bad_next_obs": write_hdf5(d / "bad_next.hdf5", next_observations=np.zeros((49, 4), np.float32)),
        "zero_rows": write_hdf5(d / "zero.hdf5", n=0),
        "obs_1d": write_hdf5(d / "obs1d.hdf5", observations=np.zeros(50, np.float32)),
        "string_rewards": write_hdf5(d / "str.hdf5", rewards=np.array([b"x"] * 50)),
        "group": write_hdf5(d / "group.hdf5", rewards="group"),
        "nan_obs": write_hdf5(d / "nan.hdf5", observations=nan_obs),
        "garbage": str(d / "garbage.hdf5"),
    }
    (d / "garbage.hdf5").write_bytes(b"not an hdf5 file at all" * 10)
    minari_dir = d / "minari_garbage" / "data"
    minari_dir.mkdir(parents=True)
    (minari_dir / "metadata.json").write_text("{}")
    (minari_dir / "main_data.hdf5").write_bytes(b"garbage")
    files["minari_garbage"] = str(d / "minari_garbage")
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(40)]
    def jl(name, lines):
        (d / name).write_text("\n".join(lines))
        return str(d / name)

    files["jsonl_bad_line"] = jl("bad_line.jsonl", [json.dumps(rows[0]), "{not json", json.dumps(rows[1])])
    files["jsonl_missing_field"] = jl("missing.jsonl", [json.dumps(r) for r in rows[:2]] + ['{"question": "q"}'])
    files["jsonl_null_answer"] = jl("null.jsonl", [json.dumps(rows[0]), '{"question": "q", "answer": null}'])
    files["jsonl_not_dict"] = jl("list.jsonl", ["[1, 2]"])
    files["jsonl_small"] = jl("small.jsonl", [json.dumps(r) for r in rows[:10]])
    files["json_string"] = jl("hello.json", ['"hello"'])
    (d / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')
    files["jsonl_not_utf8"] = str(d / "latin1.jsonl")
    (d / "folder.jsonl").mkdir()
    files["jsonl_folder"] = str(d / "folder.jsonl")
    (d / "a_file").write_text("x")
    files["a_file"] = str(d / "a_file")
    run = d / "old_run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    files["old_run"] = str(run)
    other = d / "not_a_run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    files["not_a_run"] = str(other)
    return files


# ---------------------------------------------------------------------------------------------------------------
# The sweep: (flags, expected message). {name} is replaced by the path of bad_files[name].
# ---------------------------------------------------------------------------------------------------------------
EDIS_CASES = [
    (["--gamma", "2"], "--gamma must be in [0, 1], got 2.0"),
    (["--tau", "-0.5"], "--tau must be in [0, 1]"),
    (["--critic-lr", "nan"], "--critic-lr must be a finite number"),
    (["--critic-lr", "0"], "--critic-lr must be > 0"),
    (["--edis-ratio", "nan"], "--edis-ratio must be a finite number"),
    (["--actor-lr", "inf"], "--actor-lr must be a finite number"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--seed", "4294967296"], "--seed must be in [0, 4294967295]"),
    (["--hidden-dim", "0"], "--hidden-dim must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--offline-steps", "-5"], "--offline-steps must be >= 0"),
    (["--edis-ratio", "1.5"], "--edis-ratio must be in [0, 1)"),
    (["--energy-pool", "0"], "--energy-pool must be >= 1"),
    (["--device", "mps"], "--device 'mps' is not supported"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--env", "antmaze-hugest"], "antmaze-large"),
    (["--output-dir", "{a_file}"], "is a file, not a folder"),
    (["--output-dir", "{a_file}/sub"], "is a file, so no folder can be made under it"),
    (["--output-dir", "{old_run}"], "already holds a run; continue it with --resume"),
    (["--output-dir", "/proc/rrl-test"], "--output-dir /proc/rrl-test"),  # cannot be created, even by root
    (["--output-dir", "{not_a_run}", "--overwrite"], "is not a run folder (no config.json)"),
    (["--resume", "/nonexistent/run"], "no checkpoint at"),
    (["--dataset-path", "/nonexistent.hdf5"], "does not exist"),
    (["--dataset-path", "{misaligned_actions}"], "'actions' has shape (25, 4), expected [50, act_dim]"),
    (["--dataset-path", "{short_rewards}"], "'rewards' has shape (49,), expected [50]"),
    (["--dataset-path", "{short_terminals}"], "'terminals' has shape (10,)"),
    (["--dataset-path", "{bad_next_obs}"], "'next_observations' has shape (49, 4)"),
    (["--dataset-path", "{zero_rows}"], "must be a non-empty [N, obs_dim] array"),
    (["--dataset-path", "{obs_1d}"], "must be a non-empty [N, obs_dim] array, got shape (50,)"),
    (["--dataset-path", "{string_rewards}"], "'rewards' holds |S1 values, not numbers"),
    (["--dataset-path", "{group}"], "'rewards' is an hdf5 group, not an array"),
    (["--dataset-path", "{nan_obs}"], "'observations' has non-finite values (first at row 7)"),
    (["--dataset-path", "{garbage}"], "cannot read"),
    (["--dataset-path", "{minari_garbage}"], "cannot read it as a Minari dataset"),
]
IQL_CASES = [(["--expectile", "1.5"], "--expectile must be in (0, 1)"), (["--beta", "-1"], "--beta must be >= 0")]
CALQL_CASES = [(["--cql-n-actions", "0"], "--cql-n-actions must be >= 1"),
               (["--q-layers", "0"], "--q-layers must be >= 1"),
               (["--cql-alpha", "-1"], "--cql-alpha must be >= 0")]
LLM_CASES = [
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--plan-gpus", "-1"], "--plan-gpus must be >= 0"),
    (["--vllm-gpu-memory-utilization", "1.5"], "--vllm-gpu-memory-utilization must be in (0, 1]"),
    (["--model", "/nonexistent/model", "--plan-gpus", "8"], "cannot read the config of model"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1"),
    (["--group-size", "0"], "--group-size must be >= 1"),
    (["--prompts-per-round", "0"], "--prompts-per-round must be >= 1"),
    (["--reward-timeout", "0"], "--reward-timeout must be in (0, 600]"),
    (["--reward-timeout", "-1"], "--reward-timeout must be in (0, 600]"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--device", "mps"], "--device 'mps' is not supported"),
    (["--device", "foo"], "--device 'foo' is not supported"),
    (["--train-split", "trian"], "the built-in task has no split 'trian'"),
    (["--output-dir", "{a_file}"], "is a file, not a folder"),
    (["--output-dir", "{old_run}"], "already holds a run"),
    (["--resume", "/nonexistent"], "no checkpoint"),
    (["--dataset", "/nonexistent.jsonl"], "no such file"),
    (["--dataset", "{jsonl_bad_line}"], "line 2 is not valid JSON"),
    (["--dataset", "{jsonl_missing_field}"], "row 3 has no (or a null) 'answer' field"),
    (["--dataset", "{jsonl_null_answer}"], "row 2 has no (or a null) 'answer' field"),
    (["--dataset", "{jsonl_not_dict}"], "row 1 is a list"),
    (["--dataset", "{jsonl_not_utf8}"], "not UTF-8 text"),
    (["--dataset", "{jsonl_folder}"], "is a folder, not a file"),
    (["--dataset", "{json_string}"], "a .json dataset must be a list of records"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model does not exist: a local model is a folder"),
    (["--model", "./no_such_dir"], "--model ./no_such_dir does not exist: a local model is a folder"),
    (["--model", "{a_file}"], "is a file: a local model is a folder with config.json"),
    (["--dataset", "{jsonl_small}", "--eval-prompts", "4", "--prompts-per-round", "16"],
     "6 training prompts (after holding out the evaluation prompts) is fewer than --prompts-per-round 16"),
]
GRPO_CASES = [(["--temperature", "0"], "--temperature must be > 0"),
              (["--epsilon-low", "1"], "--epsilon-low must be in [0, 1)"),
              (["--num-iterations", "0"], "--num-iterations must be >= 1")]
REVAL_CASES = [(["--temperature", "0.5"], "--temperature must be 1.0"), (["--beta", "0"], "--beta must be > 0"),
               (["--updates-per-round", "0"], "--updates-per-round must be >= 1")]


def _fill(flags, files):
    return [f.format(**files) if "{" in f else f for f in flags]


@pytest.mark.parametrize("script, flags, text",
                         [(s, f, t) for s in EDIS for f, t in EDIS_CASES]
                         + [("edis_iql.py", f, t) for f, t in IQL_CASES]
                         + [("edis_calql.py", f, t) for f, t in CALQL_CASES])
def test_edis_bad_input_is_one_line(script, flags, text, bad_files, tiny_pointmaze, monkeypatch, capsys, tmp_path):
    for k, v in tiny_pointmaze.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would appear here
    argv = ["--env", "pointmaze-umaze", "--device", "cpu", *_fill(flags, bad_files)]
    assert_one_line_error(EDIS[script], argv, text, capsys, tmp_path)


@pytest.mark.parametrize("script, flags, text",
                         [(s, f, t) for s in LLM for f, t in LLM_CASES]
                         + [("grpo_llm.py", f, t) for f, t in GRPO_CASES]
                         + [("reval_llm.py", f, t) for f, t in REVAL_CASES])
def test_llm_bad_input_is_one_line(script, flags, text, bad_files, tiny_model_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    argv = ["--model", tiny_model_dir, "--device", "cpu", *_fill(flags, bad_files)]  # a later --device wins
    assert_one_line_error(LLM[script], argv, text, capsys, tmp_path)


def test_unreachable_hub_model_fails_fast_without_the_offline_variable(tmp_path):
    """HF_HUB_OFFLINE unset and no network (this machine, CI): one line in seconds, not 50 s of retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    t0 = time.time()
    p = subprocess.run([sys.executable, "grpo_llm.py", "--model", "no-such-org/no-such-model", "--device", "cpu",
                        "--output-dir", str(tmp_path / "r")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "cannot load model 'no-such-org/no-such-model'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and time.time() - t0 < 30


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints never execute code
# ---------------------------------------------------------------------------------------------------------------
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("script", ["edis_iql.py", "edis_calql.py", "grpo_llm.py", "reval_llm.py"])
def test_malicious_checkpoint_is_refused_without_running_it(script, tmp_path, tiny_pointmaze, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    payload = {"args": {}, "step": Exploit(marker)}
    run = tmp_path / "run"
    if script in EDIS:
        run.mkdir()
        torch.save(payload, run / "checkpoint.pt")
        module, argv = EDIS[script], ["--resume", str(run)]
        for k, v in tiny_pointmaze.items():
            monkeypatch.setenv(k, v)
    else:
        (run / "checkpoint").mkdir(parents=True)
        torch.save(payload, run / "checkpoint" / "trainer_state.pt")
        module, argv = LLM[script], ["--resume", str(run)]
    code, err = run_inprocess(module, argv, capsys)
    assert code == 2 and "is not a checkpoint of this script, or is damaged" in err and len(err.splitlines()) == 1
    assert not marker.exists(), "loading the checkpoint executed code"
    saved = next(run.rglob("*.pt"))
    torch.load(saved, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Diverged runs stop with one line, keeping the last good checkpoint
# ---------------------------------------------------------------------------------------------------------------
TINY_EDIS = ["--env", "pointmaze-umaze", "--offline-steps", "150", "--online-steps", "0", "--eval-episodes", "1",
             "--log-every", "50", "--checkpoint-every", "50", "--hidden-dim", "32", "--batch-size", "32",
             "--device", "cpu", "--no-edis"]


@pytest.mark.parametrize("script, flags", [("edis_iql.py", ["--critic-lr", "1e10"]),  # the Gaussian actor's NaN mean
                                           ("edis_calql.py", ["--critic-lr", "1e10", "--q-layers", "2",
                                                              "--cql-n-actions", "4"])])
def test_edis_divergence_stops_with_one_line(script, flags, tiny_pointmaze, tmp_path):
    out = tmp_path / "run"
    p = run_script([script, *TINY_EDIS, *flags, "--output-dir", str(out)], tiny_pointmaze, timeout=300)
    assert p.returncode == 2 and "non-finite" in p.stderr and "at step" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (out / "summary.json").exists()
    if (out / "checkpoint.pt").exists():  # whatever checkpoint exists was written before the divergence
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["agent"].values())


def test_llm_divergence_stops_with_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    p = run_script(["grpo_llm.py", "--model", tiny_model_dir, *LLM_SMOKE, "--learning-rate", "1e10",
                    "--output-dir", str(out)], {"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 2 and "non-finite" in p.stderr and "round" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (out / "summary.json").exists()
    assert_no_dead_end(p, out, "trainer_state.pt", {"HF_HUB_OFFLINE": "1"})


def last_line(stderr: str) -> str:
    """The last line a terminal shows (a progress bar redraws its line with carriage returns)."""
    return stderr.rstrip().splitlines()[-1].split("\r")[-1]


def assert_no_dead_end(p, out, checkpoint_name: str, env: dict) -> None:
    """The divergence error is the last thing printed and says what to do next: with no checkpoint written, the exact
    command that starts afresh, which is then not refused (it may diverge again, as it does here: same flags)."""
    error = last_line(p.stderr)
    assert error.startswith("error: non-finite"), p.stderr[-1000:]
    if any(f.name == checkpoint_name for f in out.rglob(checkpoint_name)):
        assert "its last checkpoint is kept: continue from it with `python" in error and "--resume" in error
        return
    assert "no checkpoint was written" in error and "start afresh" in error, error
    command = error.split("`")[1].split()
    assert command[0] == "python" and "--overwrite" in command and str(out) in command
    again = run_script(command[1:], env, timeout=300)
    assert again.returncode == 2 and last_line(again.stderr).startswith("error: non-finite"), again.stderr[-1000:]


@pytest.mark.parametrize("script", ["edis_iql.py", "edis_calql.py"])
def test_edis_divergence_before_any_checkpoint_is_no_dead_end(script, tiny_pointmaze, tmp_path):
    """Diverged before its first checkpoint: no NaN policy is evaluated (no "offline phase done", no MuJoCo NaN
    warning), the error is the last line and gives the command that starts afresh."""
    out = tmp_path / "run"
    extra = ["--q-layers", "2", "--cql-n-actions", "4"] if script == "edis_calql.py" else []
    p = run_script([script, *TINY_EDIS, "--critic-lr", "1e10", "--checkpoint-every", "1000", *extra,
                    "--output-dir", str(out)], tiny_pointmaze, timeout=300)
    assert p.returncode == 2 and not (out / "checkpoint.pt").exists(), p.stderr[-2000:]
    assert "offline phase done" not in p.stdout and "Nan" not in p.stderr and "normalized score" not in p.stdout
    assert_no_dead_end(p, out, "checkpoint.pt", tiny_pointmaze)
    run2 = tmp_path / "run2"  # a good run, continued with a learning rate that diverges: its checkpoint is kept
    assert run_script([script, *TINY_EDIS, *extra, "--output-dir", str(run2)], tiny_pointmaze).returncode == 0
    p = run_script([script, "--resume", str(run2), "--offline-steps", "300", "--critic-lr", "1e10"], tiny_pointmaze)
    assert p.returncode == 2 and torch.load(run2 / "checkpoint.pt", weights_only=True)["step"] == 150
    assert_no_dead_end(p, run2, "checkpoint.pt", tiny_pointmaze)


# ---------------------------------------------------------------------------------------------------------------
# One writer per run folder; a finished run stays finished
# ---------------------------------------------------------------------------------------------------------------
def wait_for(path, proc, timeout=120.0):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None and time.time() - t0 < timeout, "the first run ended or never wrote " + str(path)
        time.sleep(0.1)


def test_edis_run_folder_has_one_writer(tiny_pointmaze, tmp_path):
    """A second process on a folder being written, new or --resume, is refused naming the writer's pid; once the
    writer is killed (SIGKILL: its lock file stays, its lock does not), the run resumes."""
    import signal

    out = tmp_path / "run"
    cmd = [sys.executable, "edis_iql.py", *TINY_EDIS, "--offline-steps", "200000", "--output-dir", str(out)]
    first = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **tiny_pointmaze}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "checkpoint.pt", first)
        for argv in (["--resume", str(out)], [*TINY_EDIS, "--output-dir", str(out)],
                     [*TINY_EDIS, "--output-dir", str(out), "--overwrite"]):
            p = run_script(["edis_iql.py", *argv], tiny_pointmaze)
            assert p.returncode == 2 and f"another process (pid {first.pid}) is writing this run" in p.stderr, argv
            assert len(p.stderr.strip().splitlines()) == 1 and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".lock").exists()  # a stale lock file, no longer locked
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    p = run_script(["edis_iql.py", "--resume", str(out), "--offline-steps", str(step + 50)], tiny_pointmaze)
    assert p.returncode == 0 and f"at step {step}" in p.stdout, p.stderr[-2000:]
    assert (out / "summary.json").exists()


def test_llm_run_folder_has_one_writer(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "grpo_llm.py", "--model", tiny_model_dir, *LLM_SMOKE, "--total-rounds", "100000",
           "--output-dir", str(out)]
    first = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "checkpoint" / "trainer_state.pt", first)
        p = run_script(["grpo_llm.py", "--resume", str(out)], env)
        assert p.returncode == 2 and f"another process (pid {first.pid}) is writing this run" in p.stderr
    finally:
        first.kill()
        first.wait()


def snapshot(folder) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("script", ["edis_iql.py", "grpo_llm.py"])
def test_finished_run_stays_finished(script, tiny_pointmaze, tiny_model_dir, tmp_path):
    """--resume of a finished run changes no byte; a raised budget continues it, its wall time summed over both
    sessions; --eval-only still works; a truncated weights file is named as such on resume (LLM)."""
    out = tmp_path / "run"
    if script in EDIS:
        env, base, more = tiny_pointmaze, [*TINY_EDIS, "--offline-steps", "100"], ["--online-steps", "30"]
    else:
        env, base, more = {"HF_HUB_OFFLINE": "1"}, ["--model", tiny_model_dir, *LLM_SMOKE], ["--total-rounds", "5"]
    p = run_script([script, *base, "--output-dir", str(out)], env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    before = snapshot(out)
    first_wall = json.loads((out / "summary.json").read_text())["wall_time_s"]
    p = run_script([script, "--resume", str(out)], env)
    assert p.returncode == 0 and "is a finished run" in p.stdout and "nothing was changed" in p.stdout, p.stderr
    assert snapshot(out) == before
    p = run_script([script, "--resume", str(out), "--eval-only"], env, timeout=300)
    assert p.returncode == 0 and (out / "eval.json").exists(), p.stderr[-2000:]
    t0 = time.time()
    p = run_script([script, "--resume", str(out), *more], env, timeout=300)
    assert p.returncode == 0 and "is a finished run" not in p.stdout, p.stderr[-2000:]
    wall = json.loads((out / "summary.json").read_text())["wall_time_s"]
    assert first_wall < wall < first_wall + time.time() - t0
    if script in LLM:
        weights = out / "checkpoint" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        p = run_script([script, "--resume", str(out), "--total-rounds", "6"], env)
        assert p.returncode == 2 and "its files are damaged or truncated" in p.stderr, p.stderr[-1000:]
        assert "offline?" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_unknown_model_type_is_named(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, model_type="foo")))
    p = run_script(["grpo_llm.py", "--model", str(bad), "--device", "cpu", "--output-dir", str(tmp_path / "r")],
                   {"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "its config.json has model_type 'foo'" in p.stderr, p.stderr[-1000:]
    assert "tokenizer" not in p.stderr.lower() and len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# Runs and caches are never clobbered
# ---------------------------------------------------------------------------------------------------------------
def test_llm_checkpoint_survives_a_kill_during_cleanup(tiny_model_dir, tmp_path):
    """A kill during rmtree(checkpoint.old) leaves checkpoint/ and a half-deleted checkpoint.old: later saves work."""
    tok, model = grpo_llm.load_model(tiny_model_dir, print)
    opt = torch.optim.AdamW(model.parameters())
    args = grpo_llm.Args(model=tiny_model_dir)
    grpo_llm.save_checkpoint(str(tmp_path), model, None, tok, opt, {"round": 1}, args, 0)
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "leftover.bin").write_bytes(b"x")
    (tmp_path / ".checkpoint-abc").mkdir()  # a save killed before its swap
    grpo_llm.save_checkpoint(str(tmp_path), model, None, tok, opt, {"round": 2}, args, 0)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["ranks"][0]["state"]["round"] == 2 and not (tmp_path / "checkpoint.old").exists()
    from utils.common import remove_stale_temp_files

    remove_stale_temp_files(str(tmp_path))
    assert not (tmp_path / ".checkpoint-abc").exists() and (tmp_path / "checkpoint").exists()


def test_interrupted_collection_leaves_no_dataset(tmp_path, monkeypatch):
    import minari

    from utils.collect import collect_pointmaze
    from utils.tasks import get_task, is_cached

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    real = minari.create_dataset_from_buffers

    def killed(*a, **k):
        real(*a, **k)  # the files are written ...
        raise KeyboardInterrupt  # ... and the process dies before the dataset is in place

    monkeypatch.setattr(minari, "create_dataset_from_buffers", killed)
    task = get_task("pointmaze-umaze")
    with pytest.raises(KeyboardInterrupt):
        collect_pointmaze(task, num_steps=400, progress=False, log=lambda s: None)
    assert not is_cached(task.local_minari_id) and os.listdir(tmp_path) == []
    monkeypatch.setattr(minari, "create_dataset_from_buffers", real)
    collect_pointmaze(task, num_steps=400, progress=False, log=lambda s: None)
    assert is_cached(task.local_minari_id)


def test_old_checkpoint_does_not_overwrite_a_newer_one(tiny_pointmaze, tmp_path):
    run = tmp_path / "run"
    p = run_script(["edis_iql.py", *TINY_EDIS, "--output-dir", str(run)], tiny_pointmaze)
    assert p.returncode == 0, p.stderr[-2000:]
    old = run / "old.pt"
    old.write_bytes((run / "checkpoint.pt").read_bytes())
    p = run_script(["edis_iql.py", "--resume", str(old)], tiny_pointmaze)
    assert p.returncode == 2 and "would overwrite" in p.stderr and "the run's latest checkpoint" in p.stderr
    p = run_script(["edis_iql.py", "--resume", str(run), "--hidden-dim", "64"], tiny_pointmaze)
    assert p.returncode == 2 and "--hidden-dim 64 (checkpoint: 32) cannot change" in p.stderr
    branch = tmp_path / "branch"  # continuing an old checkpoint elsewhere is fine
    p = run_script(["edis_iql.py", "--resume", str(old), "--output-dir", str(branch), "--online-steps", "20"],
                   tiny_pointmaze)
    assert p.returncode == 0 and (branch / "summary.json").exists(), p.stderr[-2000:]
    p = run_script(["edis_iql.py", *TINY_EDIS, "--output-dir", str(run), "--overwrite"],
                   tiny_pointmaze)
    assert p.returncode == 0 and not old.exists()  # --overwrite empties an earlier run's folder first


# ---------------------------------------------------------------------------------------------------------------
# A killed run resumes to the result of an uninterrupted one
# ---------------------------------------------------------------------------------------------------------------
RESUME_EDIS = ["--env", "pointmaze-umaze", "--offline-steps", "200", "--online-steps", "900", "--eval-every", "300",
               "--eval-episodes", "1", "--edis-retrain-every", "300", "--edis-diffusion-steps", "40",
               "--edis-num-samples", "300", "--edis-width", "32", "--edis-depth", "2", "--edis-sample-steps", "4",
               "--energy-pool", "16", "--energy-negatives", "4", "--energy-steps", "4", "--log-every", "50",
               "--checkpoint-every", "100", "--hidden-dim", "32", "--batch-size", "32", "--device", "cpu"]
DETERMINISTIC = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
VOLATILE = ("wall_time_s", "output_dir")


def same_summary(a, b):
    a, b = (json.loads(p.read_text()) for p in (a, b))
    return {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}


def same_weights(a: dict, b: dict) -> bool:
    """Bit-identical tensors (a summary of a tiny run is too coarse to show a shifted random stream)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("script, extra", [("edis_iql.py", []), ("edis_calql.py", ["--q-layers", "2",
                                                                                     "--cql-n-actions", "4"])])
def test_edis_kill_and_resume_equals_uninterrupted(script, extra, tiny_pointmaze, tmp_path):
    env = {**tiny_pointmaze, **DETERMINISTIC}
    a, b = tmp_path / "a", tmp_path / "b"
    p = run_script([script, *RESUME_EDIS, *extra, "--output-dir", str(a)], env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    step = run_and_kill([script, *RESUME_EDIS, *extra, "--output-dir", str(b)], env, b / "checkpoint.pt", 200)
    assert 200 < step < 1100 and not (b / "summary.json").exists()
    p = run_script([script, "--resume", str(b)], env, timeout=600)
    assert p.returncode == 0 and f"at step {step}" in p.stdout, p.stderr[-2000:]
    assert same_summary(a / "summary.json", b / "summary.json")
    final = [torch.load(d / "checkpoint.pt", weights_only=True)["agent"] for d in (a, b)]
    assert same_weights(*final)


LLM_SMOKE = ["--total-rounds", "4", "--prompts-per-round", "4", "--group-size", "4", "--max-new-tokens", "12",
             "--eval-prompts", "8", "--eval-samples", "2", "--eval-every", "3", "--micro-batch-size", "8",
             "--checkpoint-every", "2", "--device", "cpu"]


@pytest.mark.parametrize("script", ["grpo_llm.py", "reval_llm.py"])
def test_llm_resume_at_a_checkpoint_equals_uninterrupted(script, tiny_model_dir, tmp_path):
    """Stopped after the round-2 checkpoint (here by a shorter budget; its end-of-run evaluation has its own RNG and
    changes nothing), then resumed: the same result as the uninterrupted run."""
    env = {"HF_HUB_OFFLINE": "1", **DETERMINISTIC}
    a, b = tmp_path / "a", tmp_path / "b"
    base = [script, "--model", tiny_model_dir, *LLM_SMOKE]
    assert run_script([*base, "--output-dir", str(a)], env).returncode == 0
    assert run_script([*base, "--total-rounds", "2", "--output-dir", str(b)], env).returncode == 0
    p = run_script([script, "--resume", str(b), "--total-rounds", "4"], env)
    assert p.returncode == 0 and "at round 2" in p.stdout, p.stderr[-2000:]
    assert same_summary(a / "summary.json", b / "summary.json")
    from safetensors.torch import load_file

    assert same_weights(*(load_file(str(d / "checkpoint" / "model.safetensors")) for d in (a, b)))
    # the tiny test model rarely earns a reward, so GRPO's weights may not move at all: the sampled completions of
    # every round are what shows a shifted random stream
    sa, sb = read_scalars(str(a)), read_scalars(str(b))
    for tag in ("completions/mean_length", "train/reward", "train/loss"):
        assert len(sa[tag]) == 4 and sa[tag] == sb[tag], tag
    p = run_script([script, "--resume", str(b), "--group-size", "2"], env)
    assert p.returncode == 2 and "--group-size 2 (checkpoint: 4) cannot change" in p.stderr


# ---------------------------------------------------------------------------------------------------------------
# Evaluation prompts are never trained on
# ---------------------------------------------------------------------------------------------------------------
def test_single_file_holds_out_its_evaluation_prompts(tmp_path):
    from utils.llm_task import train_eval_split

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(100)]
    train, evals, overlap = train_eval_split(rows, rows, 20, same_source=True)
    assert len(evals) == 20 and len(train) == 80 and overlap == 0
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    assert train_eval_split(rows, rows, 20, same_source=True)[1] == evals  # the same held-out set every time
    train, evals, overlap = train_eval_split(rows, rows[90:] + [{"question": "new", "answer": "1"}], 50, False)
    assert overlap == 10 and len(train) == 90 and len(evals) == 11
    train, _, overlap = train_eval_split(rows, rows[90:], 50, False, allow_overlap=True)
    assert overlap == 10 and len(train) == 100


def test_llm_run_reports_no_overlap(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)})
                              for i in range(60)))
    out = tmp_path / "run"
    p = run_script(["grpo_llm.py", "--model", tiny_model_dir, *LLM_SMOKE, "--total-rounds", "1", "--dataset",
                    str(data), "--output-dir", str(out)], {"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "8 prompts held out of" in p.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["train_prompts"] == 52 and config["eval_prompts_used"] == 8 and config["train_eval_overlap"] == 0
    # training on the built-in task's evaluation split: every prompt is an evaluation prompt, so nothing is left
    p = run_script(["grpo_llm.py", "--model", tiny_model_dir, *LLM_SMOKE, "--train-split", "eval", "--eval-prompts",
                    "256", "--output-dir", str(tmp_path / "r2")], {"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "0 training prompts (after holding out the evaluation prompts)" in p.stderr
    assert "256 prompts held out of builtin (eval); 0 to train on" in p.stdout
