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
from utils.tasks import get_task


def make_args(task="antmaze-umaze", **kw):
    return m.make_args(env=get_task(task).name, device="cpu", offline_steps=100, online_steps=0, **kw)


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
    ends[[2499, 4999]] = True  # two episodes longer than the vectorised path handles
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
    out = m.cql_logsumexp(q_rand, q_curr, q_next, lp_curr, lp_next, act_dim=2, temp=1.0, importance=True)
    expected = math.log(math.exp(1 - 2 * math.log(0.5)) + math.exp(3 + 2) + math.exp(2 + 1))
    assert out.item() == pytest.approx(expected, rel=1e-6)
    plain = m.cql_logsumexp(q_rand, q_curr, q_next, lp_curr, lp_next, act_dim=2, temp=1.0, importance=False)
    assert plain.item() == pytest.approx(math.log(math.exp(1) + math.exp(2) + math.exp(3)), rel=1e-6)


def member_q(qf, i, s, a):
    """Critic i as a plain MLP, one state-action pair at a time (slow reference)."""
    return (qf.q1, qf.q2)[i](torch.cat([s, a], -1)).squeeze(-1)


def reference_losses(agent, batch, args, calibrate, cql_alpha, cql_batch=None):
    """CORL's Cal-QL losses written with per-critic, per-state loops; draws random numbers in calql_update's order.
    The CQL term averages over the rows of ``cql_batch`` (default: ``batch``; EDIS's --cql-rows gives other rows)."""
    s, a, r, s2, d = (batch[k] for k in m.FIELDS)
    c = batch if cql_batch is None else cql_batch
    cs, ca, cs2, mc = c["observations"], c["actions"], c["next_observations"], c["mc_returns"]
    B, A = a.shape
    Bc = len(ca)
    N = args.cql_n_actions
    alpha = agent.log_alpha.exp().item()
    pi_a, logp = agent.actor.rsample(s)
    q_pi = torch.stack([torch.min(member_q(agent.qf, 0, s[b], pi_a[b]), member_q(agent.qf, 1, s[b], pi_a[b]))
                        for b in range(B)])
    actor_loss = (alpha * logp - q_pi).mean()
    with torch.no_grad():
        n_next = N if args.cql_max_target_backup else 1
        a2, logp2 = agent.actor.rsample(s2, n_next)
        td = []
        for b in range(B):
            vals = [min(member_q(agent.q_target, 0, s2[b], a2[b, j]).item(),
                        member_q(agent.q_target, 1, s2[b], a2[b, j]).item()) for j in range(n_next)]
            j = int(np.argmax(vals))
            target = vals[j] - (alpha * logp2[b, j].item() if args.backup_entropy else 0.0)
            td.append(r[b].item() + args.gamma * (1 - d[b].item()) * target)
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
            diffs.append(torch.clamp(lse - member_q(agent.qf, i, cs[b], ca[b]), args.cql_clip_diff_min,
                                     args.cql_clip_diff_max))
        cql_terms.append(torch.stack(diffs).mean())
    if args.cql_lagrange:
        ap = torch.clamp(agent.log_alpha_prime.exp(), 0, 1e6).item()
        cql_loss = sum(ap * cql_alpha * (c - args.cql_target_action_gap) for c in cql_terms)
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
    """cql_rows (k, n): the CQL rows are the batch's rows from k on plus n other rows (--cql-rows real / base)."""
    args = make_args(hidden_dim=16, q_layers=2, cql_n_actions=3, cql_lagrange=lagrange,
                     cql_max_target_backup=max_backup, backup_entropy=True)
    torch.manual_seed(0)
    agent = m.Agent(4, 2, args, 1.0)
    batch = random_batch()
    cql_batch = None
    if cql_rows is not None:
        cql_batch = {k: v[cql_rows[0]:] for k, v in batch.items()}
        if cql_rows[1]:
            cql_batch = m.concat_batches(cql_batch, random_batch(n=cql_rows[1], seed=1))
    ref_agent = copy.deepcopy(agent)
    torch.manual_seed(5)
    out = m.calql_update(agent, m.make_optimizers(agent, args), batch, args, calibrate, 5.0, cql_batch)
    torch.manual_seed(5)
    td_loss, cql_loss, actor_loss, _, _ = reference_losses(ref_agent, batch, args, calibrate, 5.0, cql_batch)
    assert out["losses/td_loss"].item() == pytest.approx(td_loss.item(), rel=1e-4)
    assert out["losses/cql_loss"].item() == pytest.approx(cql_loss.item(), rel=1e-4, abs=1e-5)
    assert out["losses/actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-4)


@pytest.mark.parametrize("cql_rows, mixing, n_off, expect", [
    ("all", 0.5, 0, None), ("real", 0.5, 2, (6, 0)), ("base", 0.5, 0, (6, 6)), ("base", 0.25, 0, (6, 2)),
    ("base", 0.5, 2, (6, 2)), ("base", 0.25, 3, (6, 0)), ("base", 0.0, 0, (6, 0))])
def test_cql_rows_batch_keeps_the_base_mix(cql_rows, mixing, n_off, expect):
    """An EDIS batch of 4 synthetic, 6 - n_off online and n_off offline rows: --cql-rows real keeps its last 6 rows;
    base adds offline rows until they are mixing_ratio of the CQL rows (e.g. 6 online, 0.5 -> 6 offline)."""
    args = make_args(cql_rows=cql_rows, mixing_ratio=mixing)
    batch = random_batch(n=10)
    batch["rewards"][:4] = -1.0  # synthetic
    batch["rewards"][4:10 - n_off] = 0.0  # online
    batch["rewards"][10 - n_off:] = 1.0  # offline (the batch's own)
    offline = m.ReplayBuffer(4, 2, 50, torch.device("cpu"), extra=m.BUFFER_EXTRA)
    extra_rows = random_batch(n=50, seed=3)
    extra_rows["rewards"][:] = 2.0  # offline rows drawn for the regulariser only
    offline.add_batch(extra_rows)
    out = m.cql_rows_batch(batch, 4, n_off, offline, args, torch.Generator().manual_seed(0))
    if expect is None:
        assert out is None
        return
    n_real, n_extra = expect
    r = out["rewards"]
    assert len(r) == n_real + n_extra and (r[:n_real] == batch["rewards"][4:]).all() and (r[n_real:] == 2.0).all()
    if cql_rows == "base":  # offline rows (the batch's and the extra ones): the mixing share, or more if the batch
        assert (r >= 1.0).float().mean().item() == pytest.approx(max(mixing, n_off / 6))  # already has more


@pytest.mark.parametrize("fused", [False, True])
def test_step_routes_gradients_like_four_optimizers(fused):
    """The textbook step (default) and --fused-update == CORL's four optimizers written out here, each loss
    backpropagated into its own parameters only: the actor's loss must not move the critics, and so on."""
    args = make_args(hidden_dim=16, q_layers=2, cql_n_actions=3, cql_lagrange=True, fused_update=fused)
    torch.manual_seed(0)
    agent = m.Agent(4, 2, args, 1.0)
    ref = copy.deepcopy(agent)
    batch = random_batch()
    torch.manual_seed(7)
    m.calql_update(agent, m.make_optimizers(agent, args), batch, args, True, 5.0)
    torch.manual_seed(7)
    td_loss, cql_loss, actor_loss, logp, cql_terms = reference_losses(ref, batch, args, True, 5.0)
    alpha_loss = -(ref.log_alpha * (logp.detach() + ref.target_entropy)).mean()
    alpha_prime = torch.clamp(ref.log_alpha_prime.exp(), 0, 1e6)
    alpha_prime_loss = -0.5 * sum(alpha_prime * 5.0 * (c.detach() - args.cql_target_action_gap) for c in cql_terms)
    for params, loss, lr in ((list(ref.actor.parameters()), actor_loss, args.actor_lr),
                             ([ref.log_alpha], alpha_loss, args.actor_lr),
                             (list(ref.qf.parameters()), td_loss + cql_loss, args.critic_lr),
                             ([ref.log_alpha_prime], alpha_prime_loss, args.critic_lr)):
        opt = torch.optim.Adam(params, lr=lr)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        for p_, g in zip(params, grads):
            p_.grad = g
        opt.step()
    for (name, p1), p2 in zip(agent.named_parameters(), ref.parameters()):
        if not name.startswith("q_target"):
            torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_update_equals_the_textbook_update_over_several_steps():
    """Adam's moments and the Polyak targets included: --fused-update and the textbook step stay identical."""
    agents = []
    for fused in (False, True):
        args = make_args(hidden_dim=16, q_layers=2, cql_n_actions=3, cql_lagrange=True, fused_update=fused)
        torch.manual_seed(0)
        agent = m.Agent(4, 2, args, 1.0)
        opts = m.make_optimizers(agent, args)
        for step in range(3):
            torch.manual_seed(100 + step)
            m.calql_update(agent, opts, random_batch(seed=step), args, True, 5.0)
        agents.append(agent)
    for (name, p1), p2 in zip(agents[0].state_dict().items(), agents[1].state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_every_parameter_changes(fused):
    args = make_args(hidden_dim=16, q_layers=2, cql_n_actions=3, cql_lagrange=True, fused_update=fused)
    agent = m.Agent(4, 2, args, 1.0)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    m.calql_update(agent, m.make_optimizers(agent, args), random_batch(), args, True, 5.0)
    for k, v in agent.state_dict().items():
        assert not torch.equal(before[k], v), f"{k} did not change"


def test_online_calibration_writes_mc_returns():
    args = make_args(calibration_online=True)
    buf = m.ReplayBuffer(2, 1, 10, torch.device("cpu"), extra=m.BUFFER_EXTRA)
    for rew in (-5.0, -5.0, 5.0):
        buf.add(np.zeros(2, np.float32), np.zeros(1, np.float32), rew, np.zeros(2, np.float32), 0.0)
    assert torch.all(torch.isinf(buf.data["mc_returns"][:3]))  # unfinished episode: no bound
    m.online_mc_returns(buf, torch.arange(0, 3), args, {"reward_bias": -5.0})
    np.testing.assert_allclose(buf.data["mc_returns"][:3].numpy(), slow_mc([-5.0, -5.0, 5.0], [0, 0, 1], 0.99),
                               rtol=1e-6)
    off = make_args()  # CORL's default: calibration off online, so nothing is written
    buf2 = m.ReplayBuffer(2, 1, 10, torch.device("cpu"), extra=m.BUFFER_EXTRA)
    buf2.add(np.zeros(2, np.float32), np.zeros(1, np.float32), -5.0, np.zeros(2, np.float32), 0.0)
    m.online_mc_returns(buf2, torch.arange(0, 1), off, {"reward_bias": -5.0})
    assert torch.isinf(buf2.data["mc_returns"][0])


# ---------------------------------------------------------------------------------------------------------------
# Script runs
# ---------------------------------------------------------------------------------------------------------------
CALQL_SMOKE = [*SMOKE, "--q-layers", "2", "--cql-n-actions", "4"]


def test_smoke_run_reaches_every_stage(tiny_pointmaze, tmp_path):
    out = tmp_path / "study" / "seed1" / "edis"  # (the layout benchmarks/calql_gap.py reads, used below)
    p = run_script(["edis_calql.py", *CALQL_SMOKE, "--output-dir", str(out)], tiny_pointmaze,
                   timeout=600)  # (--cql-rows base, the default: CQL rows = online + offline rows drawn for it)
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
    gap_json.write_text(json.dumps({"runs": [{"seed": 9, "arm": "edis", "old": True},
                                             {"seed": 1, "arm": "edis", "old": True}]}))
    p = run_script(["benchmarks/calql_gap.py", "--runs", str(tmp_path / "study"), "--rows", "64", "--out",
                    str(gap_json)], tiny_pointmaze, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    kept, row = json.loads(gap_json.read_text())["runs"]
    assert kept == {"seed": 9, "arm": "edis", "old": True} and "old" not in row
    assert (row["seed"], row["arm"]) == (1, "edis") and row["alpha_prime"] > 0
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
    p = run_script(["edis_calql.py", "--resume", str(out), "--online-steps", "160", "--calibration-online"],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed {out} at step 250" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 310 and summary["online_env_steps"] == 160
    # an edis_calql.py checkpoint handed to edis_iql.py: one line, no traceback
    p = run_script(["edis_iql.py", "--resume", str(out)], tiny_pointmaze)
    assert p.returncode == 2 and "not a checkpoint of this script" in p.stderr and "Traceback" not in p.stderr
