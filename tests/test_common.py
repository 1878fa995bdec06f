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


def test_cli_with_presets_precedence_chaining_and_help(capsys):
    """The one preset mechanism of the four scripts: presets replace the written defaults, a flag given on the command
    line always wins, a preset may set the flag another preset depends on, and --help shows the resolved values."""
    import dataclasses

    from utils.common import cli_with_presets

    @dataclasses.dataclass
    class A:
        preset: str = "none"
        """a named preset"""
        model: str = "small"
        """the model"""
        lr: float = 1.0
        """the learning rate"""
        steps: int = 10
        """the budget"""

    def presets(a: A) -> dict:  # the named preset sets the model; the model sets the learning rate
        return {**({"model": "big", "steps": 99} if a.preset == "paper" else {}),
                "lr": 0.001 if a.model == "big" else 1.0}

    assert cli_with_presets(A, [], presets) == A()
    assert cli_with_presets(A, ["--preset", "paper"], presets) == A("paper", "big", 0.001, 99)  # chained
    assert cli_with_presets(A, ["--preset", "paper", "--steps", "5", "--lr", "0.5"], presets) == A(
        "paper", "big", 0.5, 5)  # explicit flags win over both presets
    assert cli_with_presets(A, ["--model", "big"], presets).lr == 0.001
    assert cli_with_presets(A, ["--preset", "paper", "--model", "small"], presets).lr == 1.0
    with pytest.raises(SystemExit):
        cli_with_presets(A, ["--preset", "paper", "--help"], presets)
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: big)" in out and "(default: 0.001)" in out and "(default: 99)" in out


@pytest.mark.parametrize("argv,shown", [
    (["edis_iql.py", "--env", "antmaze-large", "--help"], ["--expectile FLOAT", "(default: 0.9)", "--edis-ratio FLOAT",
                                                            "(default: 0.1)", "(default: 100)"]),
    (["edis_calql.py", "--env", "hopper-medium", "--help"], ["(default: 0.2)"]),
    (["reval_llm.py", "--preset", "paper-7b", "--help"], ["(default: Qwen/Qwen2.5-Math-7B)", "(default: 1e-06)",
                                                           "(default: 0.02)", "(default: 200)"]),
    (["grpo_llm.py", "--model", "some/hub-model", "--help"], ["(default: 1e-06)"]),
])
def test_help_shows_the_preset_values(argv, shown):
    """`--help` after a task, device, preset or model prints the values a run with them would use."""
    p = run_script(argv, {"COLUMNS": "400"})  # one help line per flag
    assert p.returncode == 0, p.stderr[-2000:]
    out = " ".join(p.stdout.split())
    for s in shown:
        assert s in out, (s, out[:3000])


def test_resume_of_another_version_names_its_unknown_flags():
    """A checkpoint whose config has a flag that no longer exists (an older version) is refused in one line that
    names the flag; another script's checkpoint (mostly unknown flags) keeps the plain message."""
    import dataclasses
    from typing import Optional

    from utils.common import UserError, resumed_args

    @dataclasses.dataclass
    class A:
        seed: int = 1
        lr: float = 0.1
        steps: int = 5
        output_dir: Optional[str] = None

    with pytest.raises(UserError) as e:
        resumed_args(A, [], {"args": {"seed": 2, "lr": 0.2, "steps": 3, "old_flag": True}}, "/run", set(), "--resume x")
    assert "not a checkpoint of this script" in str(e.value) and "--old-flag" in str(e.value)
    with pytest.raises(UserError) as e:
        resumed_args(A, [], {"args": {"seed": 2, "a": 1, "b": 2, "c": 3}}, "/run", set(), "--resume x")
    assert "not a checkpoint of this script" in str(e.value) and "another version" not in str(e.value)
    ok = resumed_args(A, ["--lr", "0.3"], {"args": {"seed": 2, "lr": 0.2, "steps": 3}}, "/run", {"lr"}, "--resume x")
    assert (ok.seed, ok.lr, ok.output_dir) == (2, 0.3, "/run")


def test_optional_bool_flags_take_their_bare_forms():
    """--fsdp and --no-fsdp as the README writes them; --fsdp True/False still work; neither: None (the machine
    decides)."""
    import grpo_llm
    from utils.common import peek_args

    cases = {(): (None, None), ("--fsdp",): (True, None), ("--no-fsdp",): (False, None),
             ("--fsdp", "False"): (False, None), ("--fsdp", "--bf16"): (True, True),
             ("--no-bf16", "--fsdp", "True"): (True, False), ("--bf16", "None"): (None, None)}
    for argv, want in cases.items():
        a = peek_args(grpo_llm.Args, list(argv))
        assert (a.fsdp, a.bf16) == want, argv


def test_bf16_default_follows_the_hardware_and_the_evidence(monkeypatch, tmp_path):
    """bf16 by default on a device that computes it natively: CUDA GPUs with bf16 always, CPUs with AVX512-BF16 or
    AMX only once BF16_CPU_DEFAULT is set (the evidence); the CPU flags are read from /proc/cpuinfo."""
    import builtins

    from utils import run

    real_open = builtins.open
    for flags, native in (("fpu sse avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True),
                          ("fpu sse avx512f", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(
            tmp_path / "cpuinfo" if p == "/proc/cpuinfo" else p, *a, **k))
        cpu = torch.device("cpu")
        assert run.native_bf16(cpu) is native
        presets = {"cpu": {}, "cuda": {}}
        assert run.preset_defaults(cpu, presets, {}, {}, {})["bf16"] is False  # the CPU default waits
        monkeypatch.setattr(run, "BF16_CPU_DEFAULT", True)
        assert run.preset_defaults(cpu, presets, {}, {}, {})["bf16"] is native
        monkeypatch.setattr(run, "BF16_CPU_DEFAULT", False)
        p = run.set_precision(cpu, False, True)  # TF32 is CUDA's: fp32 matmuls stay IEEE on a CPU
        assert p == {"autocast": "off", "fp32_matmul": "ieee", "native_bf16": native}
