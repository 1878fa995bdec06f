"""grpo_llm.py: advantages, the three loss aggregations, clipping and KL against slow references; log-probs against
generation scores; parameter updates; smoke, resume and 2-process torchrun runs on the tiny model."""

import json
import math

import pytest
import torch

import grpo_llm as g
from tests.conftest import read_scalars, run_script, run_torchrun


def args_for(**kw):
    base = dict(max_new_tokens=6, group_size=4, prompts_per_round=2, micro_batch_size=3)
    base.update(kw)
    return g.Args(**base)


# ---------------------------------------------------------------------------------------------------------------
# Advantages, losses, clipping, KL
# ---------------------------------------------------------------------------------------------------------------
def slow_advantages(rewards, G, scale):
    groups = [rewards[i:i + G] for i in range(0, len(rewards), G)]
    out = []
    all_mean = sum(rewards) / len(rewards)
    all_std = math.sqrt(sum((r - all_mean) ** 2 for r in rewards) / (len(rewards) - 1))
    for grp in groups:
        mean = sum(grp) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (G - 1))  # unbiased, as torch.std
        for r in grp:
            out.append((r - mean) / ((std if scale == "group" else all_std) + 1e-4) if scale != "none" else r - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    got = g.group_advantages(torch.tensor(rewards), 4, scale)
    assert got.tolist() == pytest.approx(slow_advantages(rewards, 4, scale), rel=1e-5, abs=1e-6)
    assert got[4:8].abs().max() == 0  # an all-correct group carries no signal


@pytest.mark.parametrize("scale", ["group", "none"])
def test_singleton_groups_keep_raw_reward(scale):
    """verl's rule for one rollout per prompt: mean 0, std 1, so GRPO becomes REINFORCE on the raw 0/1 reward."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    got = g.group_advantages(rewards, 1, scale)
    assert got.tolist() == pytest.approx([r / (1 + 1e-4) if scale == "group" else r for r in rewards.tolist()])


def fixed_batch(seed=0, B=6, T=5):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, generator=gen)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return logp, old, adv, mask, lengths


def slow_loss(logp, old, adv, mask, lengths, loss_type, el, eh, L):
    """DeepSeekMath Eq. 3 / Dr. GRPO / DAPO written as loops over sequences and tokens."""
    B = logp.shape[0]
    per_seq, total, tokens = [], 0.0, 0
    for i in range(B):
        s = 0.0
        for t in range(int(lengths[i])):
            ratio = math.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            s += -min(ratio * a, min(max(ratio, 1 - el), 1 + eh) * a)
        per_seq.append(s / int(lengths[i]))
        total += s
        tokens += int(lengths[i])
    if loss_type == "grpo":
        return sum(per_seq) / B  # (1/G) sum_i (1/|o_i|) sum_t
    if loss_type == "dr_grpo":
        return total / (B * L)  # constant normaliser G * L
    return total / tokens  # DAPO token-level


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_aggregations_match_slow_reference(loss_type):
    logp, old, adv, mask, lengths = fixed_batch()

    def objective(sl):
        return g.grpo_objective(logp[sl], old[sl], None, adv[sl], mask[sl], loss_type, 0.2, 0.28, 0.0)[0]

    got = objective(slice(None)) / g.loss_normalizer(mask, loss_type, max_new_tokens=5)
    assert got.item() == pytest.approx(slow_loss(logp, old, adv, mask, lengths, loss_type, 0.2, 0.28, 5), rel=1e-5)
    # split into micro-batches, the summed shares with the global normaliser give the same loss
    norm = g.loss_normalizer(mask, loss_type, 5)
    parts = sum(objective(slice(s, s + 2)) / norm for s in range(0, 6, 2))
    assert parts.item() == pytest.approx(got.item(), rel=1e-6)


def test_kl_term_matches_a_loop():
    """beta > 0 adds beta * sum of the Eq. 4 estimator over completion tokens, aggregated like the surrogate."""
    logp, old, adv, mask, lengths = fixed_batch()
    ref = logp - 0.4 * torch.ones_like(logp)
    with_kl = g.grpo_objective(logp, old, ref, adv, mask, "dapo", 0.2, 0.28, 0.5)[0]
    without = g.grpo_objective(logp, old, None, adv, mask, "dapo", 0.2, 0.28, 0.0)[0]
    expected = sum(math.exp(-0.4) + 0.4 - 1.0 for i in range(6) for t in range(int(lengths[i])))
    assert (with_kl - without).item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_clipping_behaviour():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]])).requires_grad_(True)  # ratios
    for a, zero_grad_at in ((1.0, [0]), (-1.0, [1])):  # A > 0: clip above 1.28; A < 0: clip below 0.8
        loss, clipped, _ = g.grpo_objective(logp, old, None, torch.tensor([a]), torch.ones(1, 4), "dapo", 0.2, 0.28,
                                            0.0)
        (grad,) = torch.autograd.grad(loss, logp)
        for t in range(4):
            if t in zero_grad_at:
                assert clipped[0, t] and grad[0, t] == 0
            else:  # d/dlogp of -ratio * A = -ratio * A
                assert not clipped[0, t]
                assert grad[0, t].item() == pytest.approx(-math.exp(logp[0, t].item()) * a, rel=1e-6)


def test_k3_kl_is_unbiased_and_nonnegative():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(10, generator=gen), 0)
    q = torch.softmax(torch.randn(10, generator=gen), 0)
    def k3(logp, ref):  # the KL_it that grpo_objective returns, for one "completion" of 10 tokens
        return g.grpo_objective(logp[None], logp[None], ref[None], torch.zeros(1), torch.ones(1, 10), "dapo", 0.2,
                                0.28, 1.0)[2][0]

    kl = k3(p.log(), q.log())
    assert torch.all(kl >= 0)
    exact_kl = (p * (p.log() - q.log())).sum()
    assert (p * kl).sum().item() == pytest.approx(exact_kl.item(), rel=1e-5)  # E_{a~pi}[k3] = KL(pi || ref)
    assert k3(p.log(), p.log()).abs().max() == 0


# ---------------------------------------------------------------------------------------------------------------
# Model-level checks on the tiny built-in model
# ---------------------------------------------------------------------------------------------------------------
def load(tiny):
    return g.load_model(tiny, lambda *a: None)


def test_training_logprobs_match_generation_scores(tiny_model_dir):
    tok, model = load(tiny_model_dir)
    model.eval()
    prompts = ["Question: Leo has 3 apples. How many apples does Leo have now?\nAnswer:", "Question: short\nAnswer:"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc.attention_mask == 0).any()  # left padding is exercised
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    completion = out.sequences[:, enc.input_ids.shape[1]:]
    gen_logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).gather(
        -1, completion.unsqueeze(-1)).squeeze(-1)
    is_eos = completion == tok.eos_token_id
    mask = ((is_eos.cumsum(1) - is_eos.long()) == 0).long()
    batch = {"prompt_ids": enc.input_ids, "prompt_mask": enc.attention_mask, "completion_ids": completion,
             "completion_mask": mask}
    with torch.no_grad():
        train_logp = g.token_logprobs(g.sequence_logits(model, batch), completion)
    diff = ((train_logp - gen_logp).abs() * mask).max().item()
    assert diff < 1e-4


def test_every_trainable_parameter_changes_after_one_update(tiny_model_dir):
    tok, model = load(tiny_model_dir)
    args = args_for(learning_rate=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.named_parameters()}
    torch.manual_seed(0)
    batch = g.generate(model, tok, ["Question: a\nAnswer:", "Question: b\nAnswer:"], 4, args)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    batch = g.prepare_round(model, None, tok, batch, rewards, args)  # main()'s GRPO region, mu = 1
    metrics = g.optimizer_step(model, opt, batch, args, 1, lambda: torch.autocast("cpu", enabled=False))
    assert math.isfinite(metrics["train/loss"])
    for k, v in model.named_parameters():
        assert not torch.equal(before[k], v), f"{k} did not change"


# ---------------------------------------------------------------------------------------------------------------
# Script runs
# ---------------------------------------------------------------------------------------------------------------
SMOKE = ["--total-rounds", "3", "--prompts-per-round", "4", "--group-size", "4", "--max-new-tokens", "12",
         "--eval-prompts", "8", "--eval-samples", "2", "--eval-every", "2", "--micro-batch-size", "8",
         "--device", "cpu"]
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def test_smoke_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    p = run_script(["grpo_llm.py", "--model", tiny_model_dir, *SMOKE, "--output-dir", str(out)], OFFLINE)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 3 and s["updates"] == 3 and s["generated_trajectories"] == 3 * 4 * 4
    for k in ("initial_eval_accuracy", "final_eval_accuracy", "wall_time_s"):
        assert s[k] is not None
    assert (out / "checkpoint" / "config.json").exists() and (out / "checkpoint" / "trainer_state.pt").exists()
    tags = read_scalars(str(out))
    for tag in ("train/reward", "train/kl", "train/clip_frac", "train/entropy", "completions/mean_length",
                "eval/accuracy", "eval/accuracy_sampled", "time/generation_tokens_per_s", "time/train_tokens_per_s"):
        assert tag in tags, tag
    p = run_script(["grpo_llm.py", "--resume", str(out), "--total-rounds", "5"], OFFLINE)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed" in p.stdout and "at round 3" in p.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 5 and s["updates"] == 5 and s["generated_trajectories"] == 5 * 16


def test_torchrun_two_processes(tiny_model_dir, tmp_path):
    s = run_torchrun("grpo_llm.py", ["--model", tiny_model_dir, *SMOKE, "--output-dir", str(tmp_path / "ddp")],
                     OFFLINE, port=29531)
    assert s["world_size"] == 2 and s["rounds"] == 3 and s["updates"] == 3
    assert s["generated_trajectories"] == 3 * 16  # 4 prompts x 4 samples per round, split over the two ranks


@pytest.mark.parametrize("flags, text", [
    (["--model", "/nonexistent/model/dir"], "--model /nonexistent/model/dir does not exist"),
    (["--model", "no-such-org/no-such-model"], "cannot load model"),
    (["--group-size", "0"], "--group-size must be >= 1"),
    (["--resume", "/nonexistent"], "no checkpoint"),
    (["--dataset", "/nonexistent.csv"], "cannot load dataset"),
])
def test_bad_input_one_line_errors(flags, text):
    p = run_script(["grpo_llm.py", *flags], OFFLINE, timeout=60)
    assert p.returncode == 2 and text in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
