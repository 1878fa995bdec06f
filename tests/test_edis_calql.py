"""edis_calql.py: Monte-Carlo returns, CQL / Cal-QL losses against slow references, smoke and resume runs."""

import copy
import json
import math

import numpy as np
import pytest
import torch

import edis_calql as m
from tests.conftest import read_scalars, run_script
from tests.test_edis_iql import SMOKE

CQL = dict(gamma=0.99, tau=0.005, n_actions=3, max_target_backup=True, lagrange=True, clip_min=-200.0)


# ---------------------------------------------------------------------------------------------------------------
# Monte-Carlo returns-to-go
# ---------------------------------------------------------------------------------------------------------------
def slow_mc(rewards, ends, gamma, fail=None):
    rewards = [float(x) for x in rewards]  # python floats: float64 arithmetic
    out, g, episode = [0.0] * len(rewards), 0.0, []
    for t in range(len(rewards) - 1, -1, -1):  # backwards, restarting at every episode end
        if ends[t]:
            g, episode = 0.0, []
        g = rewards[t] + gamma * g
        out[t] = g
        episode.append(t)
        if t == 0 or ends[t - 1]:  # the episode is complete: apply the sparse failure rule
            if fail is not None and all(rewards[k] == fail for k in episode):
                for k in episode:
                    out[k] = rewards[k] / (1 - gamma)
    return np.array(out)


def test_mc_returns_match_slow_loop_dense():
    rng = np.random.default_rng(0)
    r = rng.normal(size=500).astype(np.float32)
    ends = rng.random(500) < 0.02  # episodes of random lengths (terminals or timeouts alike)
    ends[-1] = True
    np.testing.assert_allclose(m.mc_returns(r, ends, 0.99), slow_mc(r, ends, 0.99), rtol=1e-5, atol=1e-4)


def test_mc_returns_sparse_failure_and_success():
    # AntMaze after Cal-QL's transform 10 r - 5: failure steps are -5, a goal step +5.
    fail_ep = [-5.0] * 4  # never reached the goal, cut by a timeout: -5 / (1 - gamma) everywhere
    success_ep = [-5.0, -5.0, 5.0]  # reached the goal (terminal): plain discounted sums
    r = np.array(fail_ep + success_ep, dtype=np.float32)
    ends = np.array([0, 0, 0, 1, 0, 0, 1], dtype=bool)
    g = m.mc_returns(r, ends, 0.99, sparse_failure_reward=-5.0)
    np.testing.assert_allclose(g[:4], -500.0, rtol=1e-6)
    np.testing.assert_allclose(g[4:], [-5 - 0.99 * 5 + 0.99**2 * 5, -5 + 0.99 * 5, 5.0], rtol=1e-6)
    np.testing.assert_allclose(g, slow_mc(r, ends, 0.99, fail=-5.0), rtol=1e-6)
    # without the sparse convention the failed episode's return is truncated at its timeout
    np.testing.assert_allclose(m.mc_returns(r, ends, 0.99)[:4], slow_mc(r, ends, 0.99)[:4], rtol=1e-6)


def test_mc_returns_long_episode_path():
    rng = np.random.default_rng(1)
    r = rng.normal(size=5000).astype(np.float32)
    ends = np.zeros(5000, dtype=bool)
    ends[[2499, 4999]] = True  # two long episodes
    np.testing.assert_allclose(m.mc_returns(r, ends, 0.995), slow_mc(r, ends, 0.995), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Actor, CQL pieces
# ---------------------------------------------------------------------------------------------------------------
def test_tanh_gaussian_logp_matches_torch_distribution():
    torch.manual_seed(0)
    actor = m.TanhGaussianActor(4, 3, 16, max_action=1.0)
    s = torch.randn(64, 4)
    torch.manual_seed(1)
    a, logp = actor.rsample(s)
    mu, log_std = actor._mu_logstd(s)
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mu, log_std.exp()),
                                                       torch.distributions.TanhTransform(cache_size=1))
    ref = dist.log_prob(a.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1)
    ok = a.abs().max(-1).values < 0.999  # away from the saturated edge where the reference loses precision
    torch.testing.assert_close(logp[ok], ref[ok], rtol=1e-3, atol=1e-3)


def test_cql_logsumexp_hand_value():
    q_rand, q_curr, q_next = (torch.tensor([[[v]]]) for v in (1.0, 2.0, 3.0))
    lp_curr, lp_next = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    out = m.cql_logsumexp(q_rand, q_curr, q_next, lp_curr, lp_next, act_dim=2)
    expected = math.log(math.exp(1 - 2 * math.log(0.5)) + math.exp(3 + 2) + math.exp(2 + 1))
    assert out.item() == pytest.approx(expected, rel=1e-6)


def member_q(qf, i, s, a):
    """Critic i as a plain MLP, one state-action pair at a time (slow reference)."""
    return (qf.q1, qf.q2)[i](torch.cat([s, a], -1)).squeeze(-1)


def reference_losses(agent, batch, kw, calibrate, cql_alpha, cql_batch=None):
    """CORL's Cal-QL losses written with per-critic, per-state loops; draws random numbers in calql_update's order.
    The CQL term averages over the rows of ``cql_batch`` (default: ``batch``; --edis-extras gives other rows)."""
    s, a, r, s2, d = (batch[k] for k in m.FIELDS)
    c = batch if cql_batch is None else cql_batch
    cs, ca, cs2, mc = c["observations"], c["actions"], c["next_observations"], c["mc_returns"]
    B, A = a.shape
    Bc = len(ca)
    N = kw["n_actions"]
    alpha = agent.log_alpha.exp().item()
    pi_a, logp = agent.actor.rsample(s)
    q_pi = torch.stack([torch.min(member_q(agent.qf, 0, s[b], pi_a[b]), member_q(agent.qf, 1, s[b], pi_a[b]))
                        for b in range(B)])
    actor_loss = (alpha * logp - q_pi).mean()
    with torch.no_grad():
        n_next = N if kw["max_target_backup"] else 1
        a2, _ = agent.actor.rsample(s2, n_next)
        td = []
        for b in range(B):
            vals = [min(member_q(agent.q_target, 0, s2[b], a2[b, j]).item(),
                        member_q(agent.q_target, 1, s2[b], a2[b, j]).item()) for j in range(n_next)]
            td.append(r[b].item() + kw["gamma"] * (1 - d[b].item()) * max(vals))
        a_rand = torch.rand(Bc, N, A) * 2 - 1
        a_curr, lp_curr = agent.actor.rsample(cs, N)
        a_next, lp_next = agent.actor.rsample(cs2, N)
    td_loss, cql_terms = 0.0, []
    for i in range(2):
        qd = torch.stack([member_q(agent.qf, i, s[b], a[b]) for b in range(B)])
        td_loss = td_loss + torch.mean((qd - torch.tensor(td)) ** 2)
        diffs = []
        for b in range(Bc):
            vals = []
            for j in range(N):
                vals.append(member_q(agent.qf, i, cs[b], a_rand[b, j]) - A * math.log(0.5))
            for j in range(N):
                q = member_q(agent.qf, i, cs[b], a_next[b, j])
                vals.append((torch.maximum(q, mc[b]) if calibrate else q) - lp_next[b, j])
            for j in range(N):
                q = member_q(agent.qf, i, cs[b], a_curr[b, j])
                vals.append((torch.maximum(q, mc[b]) if calibrate else q) - lp_curr[b, j])
            lse = torch.logsumexp(torch.stack(vals), 0)
            diffs.append(torch.clamp(lse - member_q(agent.qf, i, cs[b], ca[b]), min=kw["clip_min"]))
        cql_terms.append(torch.stack(diffs).mean())
    if kw["lagrange"]:
        ap = torch.clamp(agent.log_alpha_prime.exp(), 0, 1e6).item()
        cql_loss = sum(ap * cql_alpha * (c - 0.8) for c in cql_terms)
    else:
        cql_loss = sum(cql_alpha * c for c in cql_terms)
    return td_loss, cql_loss, actor_loss, logp, cql_terms


def random_batch(n=6, obs=4, act=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(n, obs, generator=g), "actions": torch.rand(n, act, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_observations": torch.randn(n, obs, generator=g),
            "terminals": (torch.rand(n, generator=g) < 0.3).float(), "mc_returns": torch.randn(n, generator=g) * 3}


@pytest.mark.parametrize("calibrate, lagrange, max_backup, cql_rows", [
    (True, True, True, None), (False, False, False, None), (True, False, True, None), (True, True, True, (2, 0)),
    (False, False, True, (5, 0)), (True, True, True, (3, 4))])
def test_calql_losses_match_slow_reference(calibrate, lagrange, max_backup, cql_rows):
    """cql_rows (k, n): the CQL rows are the batch's rows from k on plus n other rows (--edis-extras)."""
    kw = dict(CQL, lagrange=lagrange, max_target_backup=max_backup)
    torch.manual_seed(0)
    agent = m.Agent(4, 2, 16, 1.0, 2)
    batch = random_batch()
    cql_batch = None
    if cql_rows is not None:
        cql_batch = {k: v[cql_rows[0]:] for k, v in batch.items()}
        if cql_rows[1]:
            cql_batch = m.concat_batches(cql_batch, random_batch(n=cql_rows[1], seed=1))
    ref_agent = copy.deepcopy(agent)
    torch.manual_seed(5)
    out = m.calql_update(agent, m.make_optimizers(agent, 3e-4, 1e-4), batch, cql_batch, calibrate=calibrate,
                         cql_alpha=5.0, **kw)
    torch.manual_seed(5)
    td_loss, cql_loss, actor_loss, _, _ = reference_losses(ref_agent, batch, kw, calibrate, 5.0, cql_batch)
    assert out["losses/td_loss"].item() == pytest.approx(td_loss.item(), rel=1e-4)
    assert out["losses/cql_loss"].item() == pytest.approx(cql_loss.item(), rel=1e-4, abs=1e-5)
    assert out["losses/actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-4)


def test_cql_rows_batch_keeps_the_base_mix():
    """--edis-extras: an EDIS batch of 4 synthetic and 6 online rows gives the CQL regulariser its 6 online rows and
    6 offline rows drawn for it (Cal-QL's 50 % offline share without EDIS)."""
    batch = random_batch(n=10)
    batch["rewards"][:4] = -1.0  # synthetic
    batch["rewards"][4:] = 0.0  # online
    offline = m.ReplayBuffer(4, 2, 50, torch.device("cpu"), extra=m.BUFFER_EXTRA)
    extra_rows = random_batch(n=50, seed=3)
    extra_rows["rewards"][:] = 2.0  # offline rows drawn for the regulariser only
    offline.add_batch(extra_rows)
    out = m.cql_rows_batch(batch, 4, offline, torch.Generator().manual_seed(0))
    r = out["rewards"]
    assert len(r) == 12 and (r[:6] == 0.0).all() and (r[6:] == 2.0).all()


def test_step_routes_gradients_like_four_optimizers():
    """The update == CORL's four optimizers written out here, each loss backpropagated into its own parameters
    only: the actor's loss must not move the critics, and so on."""
    torch.manual_seed(0)
    agent = m.Agent(4, 2, 16, 1.0, 2)
    ref = copy.deepcopy(agent)
    batch = random_batch()
    torch.manual_seed(7)
    m.calql_update(agent, m.make_optimizers(agent, 3e-4, 1e-4), batch, None, calibrate=True, cql_alpha=5.0, **CQL)
    torch.manual_seed(7)
    td_loss, cql_loss, actor_loss, logp, cql_terms = reference_losses(ref, batch, CQL, True, 5.0)
    alpha_loss = -(ref.log_alpha * (logp.detach() + ref.target_entropy)).mean()
    alpha_prime = torch.clamp(ref.log_alpha_prime.exp(), 0, 1e6)
    alpha_prime_loss = -0.5 * sum(alpha_prime * 5.0 * (c.detach() - 0.8) for c in cql_terms)
    for params, loss, lr in ((list(ref.actor.parameters()), actor_loss, 1e-4), ([ref.log_alpha], alpha_loss, 1e-4),
                             (list(ref.qf.parameters()), td_loss + cql_loss, 3e-4),
                             ([ref.log_alpha_prime], alpha_prime_loss, 3e-4)):
        opt = torch.optim.Adam(params, lr=lr)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        for p_, g in zip(params, grads):
            p_.grad = g
        opt.step()
    for (name, p1), p2 in zip(agent.named_parameters(), ref.parameters()):
        if not name.startswith("q_target"):
            torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


def test_every_parameter_changes():
    agent = m.Agent(4, 2, 16, 1.0, 2)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    m.calql_update(agent, m.make_optimizers(agent, 3e-4, 1e-4), random_batch(), None, calibrate=True, cql_alpha=5.0,
                   **CQL)
    for k, v in agent.state_dict().items():
        assert not torch.equal(before[k], v), f"{k} did not change"


# ---------------------------------------------------------------------------------------------------------------
# Script runs
# ---------------------------------------------------------------------------------------------------------------
CALQL_SMOKE = [*SMOKE, "--q-layers", "2", "--cql-n-actions", "4"]


def test_smoke_run_reaches_every_stage(tiny_pointmaze, tmp_path):
    out = tmp_path / "study" / "seed1" / "extras"  # (the layout benchmarks/calql_gap.py reads, used below)
    p = run_script(["edis_calql.py", *CALQL_SMOKE, "--edis-extras", "--output-dir", str(out)], tiny_pointmaze,
                   timeout=600)  # (with the extras: CQL rows = online + offline rows drawn for it)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 150 + 260 and summary["edis_retrains"] == 2
    scalars = read_scalars(str(out))
    for tag in ("losses/td_loss", "losses/cql_loss", "losses/alpha", "losses/alpha_prime",
                "losses/calibration_bound_rate", "eval/normalized_score", "edis/diffusion_loss",
                "edis/energy_loss_policy", "charts/synthetic_fraction"):
        assert tag in scalars, tag
    assert scalars["charts/synthetic_fraction"][-1] == pytest.approx(0.5)
    # the study-2 diagnosis on this run: the CQL gap per row source, each measured and finite
    gap_json = tmp_path / "gap.json"  # a table from before: seed 9's run is gone from runs/, seed 1's is measured again
    gap_json.write_text(json.dumps({"runs": [{"seed": 9, "arm": "extras", "old": True},
                                             {"seed": 1, "arm": "extras", "old": True}]}))
    p = run_script(["benchmarks/calql_gap.py", "--runs", str(tmp_path / "study"), "--rows", "64", "--out",
                    str(gap_json)], tiny_pointmaze, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    kept, row = json.loads(gap_json.read_text())["runs"]
    assert kept == {"seed": 9, "arm": "extras", "old": True} and "old" not in row
    assert (row["seed"], row["arm"]) == (1, "extras") and row["alpha_prime"] > 0
    for src in ("offline", "online", "synthetic"):
        assert math.isfinite(row[src]["gap"]) and math.isfinite(row[src]["q_data"]), src
    p = run_script(["benchmarks/calql_gap.py", "--runs", str(tmp_path / "nothing"), "--out", str(gap_json)])
    assert p.returncode == 1 and "no finished Cal-QL run" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "other.json").write_text("[1, 2]")  # --out pointing at some other file: refused, not overwritten
    p = run_script(["benchmarks/calql_gap.py", "--runs", str(tmp_path / "study"), "--rows", "8", "--out",
                    str(tmp_path / "other.json")], tiny_pointmaze, timeout=300)
    assert p.returncode == 1 and "not a table of this script" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "other.json").read_text() == "[1, 2]"


def test_no_edis_and_resume_extend(tiny_pointmaze, tmp_path):
    out = tmp_path / "run"
    p = run_script(["edis_calql.py", *CALQL_SMOKE, "--no-edis", "--online-steps", "100", "--output-dir", str(out)],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["updates"] == 250
    p = run_script(["edis_calql.py", "--resume", str(out), "--online-steps", "160", "--cql-alpha-online", "2"],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed {out} at step 250" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 310 and summary["online_env_steps"] == 160
    # an edis_calql.py checkpoint handed to edis_iql.py: one line, no traceback
    p = run_script(["edis_iql.py", "--resume", str(out)], tiny_pointmaze)
    assert p.returncode == 2 and "not a checkpoint of this script" in p.stderr and "Traceback" not in p.stderr
