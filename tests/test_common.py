import os

import numpy as np
import pytest
import torch

from tests.conftest import run_script
from utils.common import atomic_torch_save, seed_everything


def test_atomic_save_roundtrip_and_failure_keeps_old_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path)["step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1  # the old checkpoint survived the failed write
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no temporary file was left behind


def test_seed_everything_reproducible():
    seed_everything(3)
    a = (np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize("script", ["edis_iql.py", "edis_calql.py", "grpo_llm.py", "reval_llm.py"])
def test_help_works(script):
    p = run_script([script, "--help"])
    assert p.returncode == 0, p.stderr
    assert "--seed" in p.stdout
