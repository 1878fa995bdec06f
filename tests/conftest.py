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
