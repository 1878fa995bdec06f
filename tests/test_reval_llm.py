"""reval_llm.py against the paper's own statements: Proposition 2, the telescoping of Eq. 2, the fixed point
pi* ~ pi_ref exp(r / beta) from off-policy data, FIFO replay and its reuse (Eq. 3); smoke, resume, torchrun."""

import copy
import json
import random

import pytest
import torch

import reval_llm as rv
from tests.conftest import read_scalars, run_script, run_torchrun
from tests.test_grpo_llm import OFFLINE, SMOKE


def load(path):
    return rv.load_model(path, lambda *a: None)


def rollout_batch(model, tok, n=4):
    args = rv.Args(max_new_tokens=10, temperature=1.0)
    torch.manual_seed(0)
    return rv.generate(model, tok, ["Question: Leo has 3 apples. How many?\nAnswer:", "Question: b\nAnswer:"], n,
                       args)


def test_proposition2_zero_loss_and_gradient_at_reference(tiny_model_dir):
    """Prop. 2: with r = 0 and theta = reference, Eq. 2's loss is 0 and so is its gradient."""
    tok, model = load(tiny_model_dir)
    ref = copy.deepcopy(model)
    batch = rollout_batch(model, tok)
    args = rv.Args(beta=0.1, micro_batch_size=64)
    batch["reward"] = torch.zeros(batch["completion_ids"].shape[0])
    batch["ref_v1"], batch["ref_logp"] = rv.reference_terms(ref, batch, args)
    loss, _ = rv.loss_terms(model, batch, args, rv.algo_normalizer(batch, args))
    assert abs(loss.item()) < 1e-10
    loss.backward()
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-8


def test_eq2_equals_square_of_summed_per_token_residuals(tiny_model_dir):
    """Eq. 2's closed form == (sum_h delta_h)^2 with delta_h = Q(s_h,a_h) - r_h/beta - Q_ref(s_h,a_h)
    + V_ref(s_{h+1}) - V(s_{h+1}), V(s_{H+1}) = 0 after EOS, r_h = r at the last token (a slow loop)."""
    tok, model = load(tiny_model_dir)
    ref = copy.deepcopy(model)
    with torch.no_grad():  # a different reference
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = rollout_batch(model, tok)
    beta, r = 0.2, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        v1, logp, _ = rv.trajectory_terms(model, batch)
        rv1, rlogp, _ = rv.trajectory_terms(ref, batch)
        closed = rv.reval_residual(v1, rv1, logp, rlogp, r, beta)
        q, q_ref = rv.sequence_logits(model, batch), rv.sequence_logits(ref, batch)
    for i in range(len(r)):
        H = int(batch["completion_mask"][i].sum())
        total = 0.0
        for h in range(H):
            a = int(batch["completion_ids"][i, h])
            v_next = torch.logsumexp(q[i, h + 1], -1).item() if h + 1 < H else 0.0
            v_ref_next = torch.logsumexp(q_ref[i, h + 1], -1).item() if h + 1 < H else 0.0
            r_h = float(r[i]) if h == H - 1 else 0.0
            total += q[i, h, a].item() - r_h / beta - q_ref[i, h, a].item() + v_ref_next - v_next
        assert closed[i].item() == pytest.approx(total, rel=1e-4, abs=1e-3)


def test_fixed_point_on_a_bandit_from_off_policy_data():
    """One-step bandit with a logits table: minimising Eq. 2 on actions from a *uniform* behaviour policy converges
    to pi = pi_ref exp(r / beta) / Z, the optimum of the KL-regularised objective (Eq. 1)."""
    torch.manual_seed(0)
    A, beta = 6, 0.5
    q_ref = torch.randn(A)
    reward = torch.tensor([0.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    q = torch.zeros(A, requires_grad=True)  # logit-as-Q of the learner
    opt = torch.optim.Adam([q], lr=0.05)
    for _ in range(3000):
        a = torch.randint(0, A, (64,))  # off-policy: uniform behaviour, not pi_theta
        v, v_ref = torch.logsumexp(q, 0), torch.logsumexp(q_ref, 0)
        delta = rv.reval_residual(v, v_ref, q[a] - v, q_ref[a] - v_ref, reward[a], beta)
        loss = delta.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    target = torch.softmax(q_ref + reward / beta, 0)
    torch.testing.assert_close(torch.softmax(q.detach(), 0), target, atol=2e-3, rtol=0)


def test_shaped_rewards():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert rv.shaped_rewards(r, 3, "binary").tolist() == r.tolist()
    assert rv.shaped_rewards(r, 3, "pm1").tolist() == [1, -1, 1, 1, -1, -1]
    expected = [1 / 3, -2 / 3, 1 / 3, 2 / 3, -1 / 3, -1 / 3]
    assert rv.shaped_rewards(r, 3, "group_mean").tolist() == pytest.approx(expected)
    assert rv.shaped_rewards(r, 1, "group_mean").tolist() == r.tolist()  # one rollout per prompt: raw reward


def test_fifo_eviction_order_and_reuse_is_k():
    """Each round adds B trajectories and draws K - 1 uniform samples of size B: the oldest leave first, and each
    trajectory is used about K times in total (Eq. 3: floor(M/B) (B/M) K = K)."""
    B, M, K = 32, 160, 3
    buf, rng = rv.new_buffer(M), random.Random(0)
    for rnd in range(300):
        rv.buffer_add(buf, [{"id": rnd * B + i} for i in range(B)], rnd)
        assert [it["id"] for it in buf["items"]] == list(range(max(0, (rnd + 1) * B - M), (rnd + 1) * B))
        for _ in range(K - 1):
            rv.buffer_sample(buf, B, rng)
    uses = buf["evicted_uses"][20 * B:]  # after the warm-up rounds
    assert sum(uses) / len(uses) == pytest.approx(K, rel=0.03)


def test_collate_roundtrip(tiny_model_dir):
    tok, model = load(tiny_model_dir)
    batch = rollout_batch(model, tok)
    batch["reward"] = torch.arange(8.0)
    batch["ref_v1"], batch["ref_logp"] = torch.zeros(8), torch.ones(8)
    again = rv.collate(rv.split_items(batch), tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        a, b = rv.trajectory_terms(model, batch), rv.trajectory_terms(model, again)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-4)


def test_smoke_resume_and_replay(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    p = run_script(["reval_llm.py", "--model", tiny_model_dir, *SMOKE, "--ref-reset-every", "2", "--output-dir",
                    str(out)], OFFLINE)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 3 and s["updates"] == 6 and s["replay_updates"] == 3 and s["ref_resets"] == 1
    tags = read_scalars(str(out))
    for tag in ("train/residual_abs", "train/kl", "train/reward", "replay/size", "eval/accuracy"):
        assert tag in tags, tag
    p = run_script(["reval_llm.py", "--resume", str(out), "--total-rounds", "4"], OFFLINE)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 4 and s["updates"] == 8 and s["replay_updates"] == 4 and s["ref_resets"] == 2
    # a reval_llm.py checkpoint handed to grpo_llm.py: one line, no traceback
    p = run_script(["grpo_llm.py", "--resume", str(out)], OFFLINE)
    assert p.returncode == 2 and "not a checkpoint of this script" in p.stderr and "Traceback" not in p.stderr


def test_torchrun_two_processes(tiny_model_dir, tmp_path):
    s = run_torchrun("reval_llm.py", ["--model", tiny_model_dir, *SMOKE, "--output-dir", str(tmp_path / "ddp")],
                     OFFLINE, port=29533)
    assert s["world_size"] == 2 and s["updates"] == 6 and s["replay_updates"] == 3


def test_temperature_must_be_one():
    p = run_script(["reval_llm.py", "--temperature", "0.7"], OFFLINE)
    assert p.returncode == 2 and "--temperature must be 1.0" in p.stderr and "Traceback" not in p.stderr
