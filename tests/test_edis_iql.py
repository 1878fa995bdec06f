"""edis_iql.py: IQL and EDIS math against hand-computed values and slow references, toys, smoke and resume runs."""

import contextlib
import copy
import importlib
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import edis_iql as m
from tests.conftest import read_scalars, run_script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
EXPECTILE, BETA, GAMMA, TAU, LR = 0.9, 10.0, 0.99, 0.005, 3e-4


# ---------------------------------------------------------------------------------------------------------------
# IQL pieces
# ---------------------------------------------------------------------------------------------------------------
def test_expectile_loss_hand_value():
    u = torch.tensor([-2.0, 1.0, 3.0])
    # |tau - 1(u<0)| u^2 with tau = 0.7: weights 0.3, 0.7, 0.7
    assert m.expectile_loss(u, 0.7).item() == pytest.approx((0.3 * 4 + 0.7 * 1 + 0.7 * 9) / 3)
    assert m.expectile_loss(u, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 9) / 3)  # tau = 0.5: half the MSE


def test_awr_weights_hand_values():
    w = m.awr_weights(torch.tensor([0.0, 1.0, -1.0, 10.0]), beta=3.0)
    np.testing.assert_allclose(w.numpy(), [1.0, math.exp(3.0), math.exp(-3.0), 100.0], rtol=1e-6)


class ConstV(torch.nn.Module):
    def forward(self, obs):
        return torch.full(obs.shape[:1], 5.0)


def test_terminal_stops_bootstrap_timeout_does_not():
    """Eq. 6's target: transition 0 ends in a true terminal (no bootstrap), transition 1 by a timeout (stored with
    terminal 0: it bootstraps from V(s') = 5)."""
    agent = m.Agent(3, 1, 8, 1.0, 0.0)
    agent.vf = ConstV()
    b = {"observations": torch.zeros(2, 3), "actions": torch.zeros(2, 1), "rewards": torch.ones(2),
         "next_observations": torch.zeros(2, 3), "terminals": torch.tensor([1.0, 0.0])}
    _, q_loss, _, _ = m.iql_losses(agent, b, 0.9, 3.0, 0.99)
    target = torch.tensor([1.0, 1.0 + 0.99 * 5.0])
    assert q_loss.item() == pytest.approx((agent.qf(b["observations"], b["actions"]) - target).pow(2).mean().item())


def slow_reference_update(agent, opts, batch):
    """CORL's order with three optimizers and three backward passes (V, then Q, then actor)."""
    opt_v, opt_q, opt_a = opts
    s, a, r, s2, d = (batch[k] for k in m.FIELDS)
    with torch.no_grad():
        tq = torch.min(agent.q_target(s, a), 0).values
        next_v = agent.vf(s2)
    v = agent.vf(s)
    adv = tq - v
    v_loss = torch.mean(torch.abs(EXPECTILE - (adv < 0).float()) * adv**2)
    opt_v.zero_grad()
    v_loss.backward()
    opt_v.step()
    target = r + GAMMA * (1 - d) * next_v
    q1, q2 = agent.qf(s, a)
    q_loss = (torch.nn.functional.mse_loss(q1, target) + torch.nn.functional.mse_loss(q2, target)) / 2
    opt_q.zero_grad()
    q_loss.backward()
    opt_q.step()
    w = torch.clamp(torch.exp(BETA * adv.detach()), max=100.0)
    logp = agent.actor.dist(s).log_prob(a).sum(-1)
    actor_loss = torch.mean(-w * logp)
    opt_a.zero_grad()
    actor_loss.backward()
    opt_a.step()
    with torch.no_grad():
        for tp, p in zip(agent.q_target.parameters(), agent.qf.parameters()):
            tp.mul_(1 - TAU).add_(TAU * p)
    return v_loss, q_loss, actor_loss


def random_batch(n=64, obs=5, act=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(n, obs, generator=g), "actions": torch.rand(n, act, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_observations": torch.randn(n, obs, generator=g),
            "terminals": (torch.rand(n, generator=g) < 0.2).float()}


def test_update_equals_a_slow_reference():
    """iql_update == CORL's order written out here with plain torch.optim.Adam, over several steps (so Adam's
    moment estimates are compared too)."""
    torch.manual_seed(0)
    agent = m.Agent(5, 2, 32, 1.0, 0.0)
    ref = copy.deepcopy(agent)
    opts = m.make_optimizers(agent, LR, LR)
    ref_opts = tuple(torch.optim.Adam(net.parameters(), lr=LR) for net in (ref.vf, ref.qf, ref.actor))
    for step in range(3):
        batch = random_batch(seed=step)
        out = m.iql_update(agent, opts, batch, EXPECTILE, BETA, GAMMA, TAU)
        v_loss, q_loss, actor_loss = slow_reference_update(ref, ref_opts, batch)
        assert out["losses/v_loss"].item() == pytest.approx(v_loss.item(), rel=1e-5)
        assert out["losses/q_loss"].item() == pytest.approx(q_loss.item(), rel=1e-5)
        assert out["losses/actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
    for (name, p1), p2 in zip(agent.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


def test_every_trainable_parameter_changes():
    agent = m.Agent(5, 2, 32, 1.0, 0.0)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    m.iql_update(agent, m.make_optimizers(agent, LR, LR), random_batch(), EXPECTILE, BETA, GAMMA, TAU)
    for k, v in agent.state_dict().items():
        assert not torch.equal(before[k], v), f"{k} did not change"


def test_twin_critics_are_the_two_plain_mlps():
    torch.manual_seed(0)
    q = m.TwinQ(5, 2, 16, 2)
    s, acts = torch.randn(7, 5), torch.randn(7, 3, 2)
    multi = q.forward_multi(s, acts)  # [2, 7, 3]
    for i, member in enumerate((q.q1, q.q2)):
        for n in range(3):
            torch.testing.assert_close(multi[i, :, n], member(torch.cat([s, acts[:, n]], -1))[:, 0])
    torch.testing.assert_close(q(s, acts[:, 0]), multi[..., 0])
    assert not torch.equal(q.q1[0].weight, q.q2[0].weight)


# ---------------------------------------------------------------------------------------------------------------
# EDM and EDIS pieces
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.002, 0.5, 1.0, 3.0, 80.0])
def test_edm_coefficients_match_karras_table1(sigma):
    c_skip, c_out, c_in, c_noise = (float(c) for c in m.edm_coefficients(torch.tensor(sigma, dtype=torch.float64)))
    sd = 1.0
    assert c_skip == pytest.approx(sd**2 / (sigma**2 + sd**2))
    assert c_out == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2))
    assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + sd**2))
    assert c_noise == pytest.approx(math.log(sigma) / 4)


def test_karras_schedule_values():
    s = m.karras_sigmas(128, torch.device("cpu"))
    assert len(s) == 129 and s[-1] == 0 and s[0].item() == pytest.approx(80.0)
    assert s[127].item() == pytest.approx(0.002, rel=1e-4)
    # Karras et al. Eq. 5 (rho = 7, sigma in [0.002, 80]) worked out by hand for N = 128
    for i, v in ((16, 38.8), (32, 17.3), (64, 2.43), (96, 0.157)):
        assert s[i].item() == pytest.approx(v, rel=0.01)
    assert torch.all(s[1:] < s[:-1])


def two_mode_data(n, g):
    """2-D toy: an equal mixture of N((-2, 0), 0.3^2) and N((2, 0), 0.3^2)."""
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return torch.stack([2.0 * sign, torch.zeros(n)], -1) + 0.3 * torch.randn(n, 2, generator=g)


SAMPLE_STEPS = 24


@pytest.fixture(scope="module")
def toy_denoiser():
    """A denoiser of the 2-D toy, half its rows trained with x[0] given (the conditional sampler's training)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ema, losses = m.train_diffusion(two_mode_data(4000, g), 1500, 64, 2, g, torch.tensor([[1.0, 0.0]]), lr=3e-3)
    return ema, losses


def test_bf16_retrain_learns_as_fp32():
    """--bf16 wraps a whole EDIS retrain (thousands of denoiser and energy steps) in one autocast region. The
    scripts' context (no weight-cast cache) trains the denoiser as fp32 does; torch.autocast's default cache would
    keep the first step's bf16 weights for every later forward, and the loss would stay where it started."""
    from utils.run import bf16_autocast

    def train(ctx):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        with ctx:
            _, losses = m.train_diffusion(two_mode_data(4000, g), 400, 64, 2, g, torch.tensor([[1.0, 0.0]]), lr=3e-3)
        return float(losses[-100:].mean()), float(losses[:20].mean())

    fp32, start = train(contextlib.nullcontext())
    bf16, _ = train(bf16_autocast(torch.device("cpu"), True))
    cached, _ = train(torch.autocast("cpu", dtype=torch.bfloat16))  # the cache: the bug this guards against
    assert fp32 < 0.85 * start and abs(bf16 / fp32 - 1) < 0.05, (start, fp32, bf16)
    assert cached > 0.95 * start, (start, cached)  # stuck where it started


def test_denoiser_loss_decreases_on_2d_toy(toy_denoiser):
    net, losses = toy_denoiser
    data = two_mode_data(4000, torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    fresh = m.ResidualMLPDenoiser(2, 64, 2)
    with torch.no_grad():  # the same noise draws for both networks
        trained = m.edm_loss(net, data, torch.Generator().manual_seed(10)).item()
        untrained = m.edm_loss(fresh, data, torch.Generator().manual_seed(10)).item()
    assert trained < 0.7 * untrained
    assert losses[-200:].mean() < losses[:20].mean()


def test_sampler_reproduces_both_modes(toy_denoiser):
    net, _ = toy_denoiser
    x = m.edm_sample(net, 2000, 2, SAMPLE_STEPS, torch.Generator().manual_seed(1))
    right = (x[:, 0] > 0).float().mean().item()
    assert 0.35 < right < 0.65  # both modes, roughly equally
    assert (x[:, 0].abs() - 2).abs().median().item() < 0.5  # samples sit on the modes


def test_sampler_shares_one_sigma_as_the_per_row_textbook(toy_denoiser):
    """The sampler passes one sigma for the batch (the time embedding once per step, the fast form); the textbook
    form embeds every row's own copy of it: the samples agree within float tolerance, guided or not."""
    net, _ = toy_denoiser

    class PerRow(torch.nn.Module):  # the textbook form: c_noise [B], one embedding per row
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, mask, c_noise):
            assert c_noise.shape == (1,)  # what the fast form passes
            return self.net(x, mask, c_noise.expand(x.shape[0]))

    nets = energies(2)
    for guidance in (None, m.make_guidance(nets, {})):
        fast = m.edm_sample(net, 256, 2, SAMPLE_STEPS, torch.Generator().manual_seed(3), guidance=guidance)
        slow = m.edm_sample(PerRow(), 256, 2, SAMPLE_STEPS, torch.Generator().manual_seed(3), guidance=guidance)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def energies(dim, names=("state", "policy", "transition")):
    return torch.nn.ModuleDict({k: m.EnergyNet(dim) for k in names})


def test_zero_guidance_reproduces_unguided_exactly(toy_denoiser):
    net, _ = toy_denoiser
    a = m.edm_sample(net, 64, 2, SAMPLE_STEPS, torch.Generator().manual_seed(5))
    b = m.edm_sample(net, 64, 2, SAMPLE_STEPS, torch.Generator().manual_seed(5),
                     guidance=lambda x, s: torch.zeros_like(x))
    assert torch.equal(a, b)
    # guidance restricted to sigma <= 1e-4 (below the schedule's smallest sigma) is no guidance at all
    c = m.edm_sample(net, 64, 2, SAMPLE_STEPS, torch.Generator().manual_seed(5),
                     guidance=lambda x, s: torch.ones_like(x), guide_sigma_max=1e-4)
    assert torch.equal(a, c)
    assert m.make_guidance(energies(4), {"state": 0.0, "policy": 0.0, "transition": 0.0}) is None


def test_guidance_is_the_full_gradient_of_the_weighted_energies():
    """CEP's noisy energy depends on the whole noisy transition: guidance is grad_x sum_k w_k E_k over every
    dimension (no block masks), checked against finite differences."""
    torch.manual_seed(0)
    nets = energies(5).double()
    weights = {"state": 0.5, "policy": 2.0, "transition": -1.0}
    guidance = m.make_guidance(nets, weights)
    x, sigma = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    g = guidance(x, sigma)
    total = lambda y: sum(w * nets[k](y, sigma).sum() for k, w in weights.items())  # noqa: E731
    eps = 1e-6
    for j in range(5):
        e = torch.zeros_like(x)
        e[:, j] = eps
        fd = [(total(x + e * (torch.arange(3) == i)[:, None]) - total(x - e * (torch.arange(3) == i)[:, None]))
              / (2 * eps) for i in range(3)]
        torch.testing.assert_close(g[:, j], torch.stack(fd), rtol=1e-5, atol=1e-7)
    assert (g.abs() > 0).all()  # every block is moved, the reward and terminal too


def test_paper_form_guides_s_a_and_next_s_only():
    """edis_retrain's guidance: the full gradient on s, a and s', zero on r and the terminal (the official code's
    masks); --edis-extras moves every dimension."""
    torch.manual_seed(0)
    codec = m.TransitionCodec(2, 1, torch.device("cpu"))  # x = [s (2), a (1), r, s' (2), d]: 7 dimensions
    nets = energies(codec.dim)
    x, sigma = torch.randn(4, codec.dim), torch.tensor([0.1, 1.0, 5.0, 50.0])
    full = m.make_guidance(nets, {})(x, sigma)
    paper = m.make_guidance(nets, {}, m.guided_dims(codec, extras=False))(x, sigma)
    assert (paper[:, [3, 6]] == 0).all() and torch.equal(paper[:, [0, 1, 2, 4, 5]], full[:, [0, 1, 2, 4, 5]])
    assert m.guided_dims(codec, extras=True) is None and (full[:, [3, 6]] != 0).all()


def test_conditional_sampling_keeps_given_block_fixed(toy_denoiser):
    net, _ = toy_denoiser
    known = torch.tensor([[1.5, 0.7]]).repeat(32, 1)
    mask = torch.tensor([1.0, 0.0])
    x = m.edm_sample(net, 32, 2, SAMPLE_STEPS, torch.Generator().manual_seed(2), known=known, known_mask=mask)
    assert torch.equal(x[:, 0], known[:, 0])  # exactly the condition
    assert not torch.equal(x[:, 1], known[:, 1])  # the free block is sampled


def test_denoiser_adam_steps_as_the_official_adamw():
    """The denoiser's optimizer is the fused Adam of adam() (the fast form); the official code's AdamW with weight
    decay 0 is the same math: 20 steps of both from the same weights stay equal within float tolerance."""
    torch.manual_seed(0)
    a = m.ResidualMLPDenoiser(3, 32, 2)
    b, start = copy.deepcopy(a), copy.deepcopy(a)
    opts = (m.adam(a.parameters(), 3e-4, betas=(0.9, 0.99)),
            torch.optim.AdamW(b.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.0, foreach=False))
    assert opts[0].defaults["fused"]
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    for step in range(20):
        for net, opt in zip((a, b), opts):
            loss = m.edm_loss(net, x, torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, p0)


def test_ema_warm_up():
    assert m.ema_decay(0) == 0.0  # the first EMA step copies the network
    assert m.ema_decay(7) == pytest.approx(1 - 8 ** (-2 / 3))  # 0.75 after 8 steps
    assert m.ema_decay(10**6) == 0.999  # capped
    init_weight = math.prod(m.ema_decay(step) for step in range(3000))  # of the random init, in the EMA
    assert init_weight == 0.0  # (a constant decay of 0.999 would keep 0.999^3000 = 5 % of it)


def test_infonce_guidance_moves_samples_to_target(toy_denoiser):
    """Prior: both modes. Target: the right mode only. An energy trained by InfoNCE (positives from the target,
    negatives from the diffusion prior, at the sampler's noise levels) must steer guided samples to the right."""
    net, _ = toy_denoiser
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    energy = m.EnergyNet(2)
    opt = torch.optim.Adam(energy.parameters(), lr=3e-3)
    target = two_mode_data(4000, g)
    target = target[target[:, 0] > 0]
    prior = m.edm_sample(net, 2000, 2, SAMPLE_STEPS, g)
    sigmas = m.karras_sigmas(SAMPLE_STEPS, torch.device("cpu"))[:-1]
    K = 8
    for _ in range(1500):
        pos = target[torch.randint(0, len(target), (128,), generator=g)]
        neg = prior[torch.randint(0, len(prior), (128, K), generator=g)]
        sigma = sigmas[torch.randint(0, len(sigmas), (128,), generator=g)]
        loss, acc = m.infonce_loss(energy, pos, neg, sigma, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    guidance = m.make_guidance(torch.nn.ModuleDict({"state": energy}), {})
    unguided = m.edm_sample(net, 1000, 2, SAMPLE_STEPS, torch.Generator().manual_seed(4))
    guided = m.edm_sample(net, 1000, 2, SAMPLE_STEPS, torch.Generator().manual_seed(4), guidance=guidance)
    frac = lambda x: (x[:, 0] > 0).float().mean().item()  # noqa: E731
    assert frac(unguided) < 0.65
    assert frac(guided) > 0.85 and frac(guided) > frac(unguided) + 0.25
    assert (guided[:, 0] - 2).abs().median().item() < 0.5  # and they land on the target mode


def test_paper_energies_and_the_extras():
    """The paper's three energies of the raw transition; --edis-extras adds the realism energy and position
    features (none outside mazes); diffusion batches: uniform (paper) or half online (extras)."""
    paper, extras = (m.EDISState(m.TransitionCodec(6, 2, torch.device("cpu"))) for _ in range(2))
    m.build_energies(paper, False, (0, 1))
    m.build_energies(extras, True, (0, 1))
    assert tuple(paper.energies) == ("state", "policy", "transition")
    assert tuple(extras.energies) == ("state", "policy", "transition", "realism")
    dim = paper.codec.dim
    assert all(e.features is None and e.net[0].in_features == dim + 1 for e in paper.energies.values())
    assert extras.energies["state"].net[0].in_features == dim + 2 * m.OCTAVES * 6 + 1  # 2 midpoint + 4 position rows
    hopper = m.EDISState(m.TransitionCodec(11, 3, torch.device("cpu")))
    m.build_energies(hopper, True, ())
    assert hopper.energies["state"].net[0].in_features == hopper.codec.dim + 1  # no maze: no features
    g = torch.Generator().manual_seed(0)
    rows = m.data_rows(1000, 100, 20_000, 0.5, g)
    assert (rows >= 900).float().mean().item() == pytest.approx(0.5, abs=0.02)  # online rows are the last 100
    rows = m.data_rows(1000, 100, 20_000, 0.0, g)
    assert (rows >= 900).float().mean().item() == pytest.approx(0.1, abs=0.01)  # uniform over all rows
    assert rows.min() >= 0 and rows.max() < 1000


def test_position_features_of_the_midpoint_translate_a_transition():
    """--edis-extras' features: u = P x with rows the maze (x, y) midway between s and s' and x, x', y', y' apart at
    16x lower frequency. A midpoint feature's gradient is the same for s and s' (its guidance moves a transition as a
    whole); each feature is sin/cos(2^k pi u) damped by exp(-(2^k pi s_u)^2 / 2), checked element by element."""
    codec = m.TransitionCodec(6, 2, torch.device("cpu"))  # PointMaze: s = (x, y, vx, vy, gx, gy)
    proj = m.position_proj(codec, (0, 1))
    x_, y_, x2, y2 = codec.s.start, codec.s.start + 1, codec.s2.start, codec.s2.start + 1
    assert proj.shape == (6, codec.dim) and proj[0, x_] == proj[0, x2] == 0.5 and proj[1, y_] == proj[1, y2] == 0.5
    assert proj[2:, [x_, x2, y_, y2]].equal(torch.eye(4)[[0, 1, 2, 3]] / 16)  # rows x, x', y, y'
    assert proj.sum() == 2.0 + 4 / 16
    feats = m.EnergyFeatures(proj.double())
    x, std = torch.randn(3, codec.dim, dtype=torch.float64), torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64)
    y = feats(x, std)
    for i in range(3):
        u = proj.double() @ x[i]
        expected = [fn(2.0**k * math.pi * float(u[j])) * math.exp(-0.5 * (2.0**k * math.pi * float(
            proj[j].norm()) * float(std[i])) ** 2) for fn in (math.sin, math.cos) for j in range(6) for k in range(8)]
        assert torch.allclose(y[i], torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    mid = m.EnergyFeatures(proj[:2])
    xs = torch.randn(4, codec.dim)
    jac = torch.autograd.functional.jacobian(lambda v: mid(v, torch.full((4,), 0.01)), xs)
    jac = jac.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [row, feature, input dim]
    assert jac.abs().sum() > 0
    assert torch.equal(jac[..., x_], jac[..., x2]) and torch.equal(jac[..., y_], jac[..., y2])
    others = [i for i in range(codec.dim) if i not in (x_, y_, x2, y2)]
    assert jac[..., others].abs().max() == 0


def test_noisy_features_are_the_expected_features_under_the_noise():
    """EnergyFeatures(x, noise_std) against a Monte-Carlo average of the undamped features of x + noise, and the bound
    on their input gradient that keeps guidance finite at every sigma."""
    torch.manual_seed(0)
    proj = torch.tensor([[0.5, 0.5], [3.0, 0.0]], dtype=torch.float64)
    feats = m.EnergyFeatures(proj)
    x, std = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.01, 0.1, 0.5], dtype=torch.float64)
    noisy = x[None] + std[None, :, None] * torch.randn(50_000, 3, 2, dtype=torch.float64)
    mc = feats(noisy.reshape(-1, 2), torch.zeros(150_000, dtype=torch.float64)).view(50_000, 3, -1).mean(0)
    assert torch.allclose(feats(x, std), mc, atol=1.5e-2)  # MC error ~ 0.7 / sqrt(50,000)
    grads = torch.autograd.functional.jacobian(lambda v: feats(v, std), x.clone())
    for i in range(3):  # |d feature / d x| <= |P_j| / (|P_j| std sqrt(e)) = 1 / (std sqrt(e)) per input dimension
        assert grads[i, :, i].abs().max() <= 1 / (float(std[i]) * math.sqrt(math.e)) + 1e-9


def test_contrastive_sets_of_every_energy():
    """Each energy's positives and negatives (shapes, and the ones that are real rows, exactly those rows)."""
    codec = m.TransitionCodec(2, 1, torch.device("cpu"))
    net = m.ResidualMLPDenoiser(codec.dim, 8, 1)
    M, K, D = 6, 3, codec.dim
    g = torch.Generator().manual_seed(0)
    x_on, x_pi, x_data = torch.randn(M, D, generator=g), torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)
    sample = lambda n, known=None, mask=None: m.sample_chunked(net, n, D, 2, g, known=known, known_mask=mask)  # noqa
    names = ("state", "policy", "transition", "realism")
    with torch.no_grad():
        sets = m.contrastive_sets(names, sample, codec, x_on, x_pi, x_data, K)
        paper = m.contrastive_sets(names[:3], sample, codec, x_on, x_pi, None, K)
    assert set(sets) == set(names) and set(paper) == set(names[:3])
    for pos, neg in sets.values():
        assert pos.shape == (M, D) and neg.shape == (M, K, D)
    assert torch.equal(sets["transition"][0], x_on) and torch.equal(sets["realism"][0], x_data)
    sa = codec.mask(codec.s, codec.a).bool()
    assert torch.equal(sets["transition"][1][:, :, sa], x_on[:, None, sa].expand(M, K, -1))  # the real (s, a) given
    assert torch.equal(sets["policy"][0][:, sa], x_pi[:, sa])  # the policy's action at the online state
    assert torch.equal(sets["state"][0][:, codec.s], x_on[:, codec.s])


def test_codec_roundtrip_blocks_and_binary_terminal():
    codec = m.TransitionCodec(3, 2, torch.device("cpu"))
    b = random_batch(50, 3, 2)
    codec.fit(codec.raw(b))
    x = codec.encode(b)
    assert x.shape == (50, 3 + 2 + 1 + 3 + 1)
    out = codec.decode(x)
    for k in ("observations", "actions", "rewards", "next_observations", "terminals"):
        torch.testing.assert_close(out[k], b[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(x[:, codec.d.start], b["terminals"])  # the terminal stays 0/1, not standardised
    assert codec.mask(codec.s, codec.a).tolist() == [1] * 5 + [0] * 5


@pytest.mark.parametrize("extras", [False, True])
def test_guidance_on_point_mass_toy(extras):
    """A 2-D point mass with a wall and a goal (benchmarks/toy_pointmass.py; known dynamics): the script's EDIS
    functions fit the prior on offline + online data and train the energies, in the paper's form and with
    --edis-extras; then, against unguided samples from the same noise, guided samples must be closer to the online
    states, no fewer inside the wall, and closer to the current policy's actions; the paper's form must lower the
    dynamics error (it did in 3 of 3 seeds of the toy study, 0.041 -> 0.022), the extras must not raise it beyond
    seed noise (the study: 0.031 -> 0.033); the conditional sampler's (r, s', d) given real (s, a) must have a
    dynamics error within 1.5x of joint samples (replacement in-painting had ~10x)."""
    toy = importlib.import_module("toy_pointmass")
    r = toy.run(1, extras, n_eval=1000, diffusion_steps=800, energy_steps=200, pool=256)
    u, g = r["unguided"], r["guided"]
    assert g["nn_dist_to_online"] < 0.5 * u["nn_dist_to_online"]
    assert g["dynamics_error"] <= (1.2 if extras else 0.8) * u["dynamics_error"]
    assert g["states_in_wall"] <= u["states_in_wall"]
    assert g["policy_action_error"] < 0.7 * u["policy_action_error"]
    assert r["online_real"]["dynamics_error"] < 1e-6  # the measurement itself: real transitions are exact
    assert r["conditional_given_sa"]["dynamics_error"] <= 1.5 * u["dynamics_error"]


# ---------------------------------------------------------------------------------------------------------------
# Script runs: smoke (offline + online updates, EDIS retrain, eval, checkpoint, summary) and resume
# ---------------------------------------------------------------------------------------------------------------
SMOKE = ["--env", "pointmaze-umaze", "--offline-steps", "150", "--online-steps", "260", "--eval-every", "100",
         "--eval-episodes", "1", "--edis-retrain-every", "120", "--edis-diffusion-steps", "60",
         "--edis-num-samples", "400", "--edis-width", "32", "--edis-depth", "2", "--edis-sample-steps", "6",
         "--energy-pool", "16", "--energy-negatives", "4", "--energy-steps", "5", "--log-every", "50",
         "--checkpoint-every", "100", "--hidden-dim", "32", "--batch-size", "32", "--device", "cpu"]


@pytest.mark.parametrize("extras", [False, True])
def test_smoke_run_reaches_every_stage(extras, tiny_pointmaze, tmp_path):
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--output-dir", str(out)] + ["--edis-extras"] * extras, tiny_pointmaze,
                   timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 150 + 260  # every offline and every online step did a gradient update
    assert summary["online_env_steps"] == 260 and summary["edis_retrains"] == 2  # retrains at 120 and 240
    for k in ("env", "seed", "offline_normalized_score", "final_normalized_score", "wall_time_s"):
        assert summary[k] is not None
    assert summary["edis_extras"] == extras
    assert (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    precision = json.loads((out / "config.json").read_text())["precision"]  # what the run computed in
    assert precision["autocast"] == "off" and precision["fp32_matmul"] == "ieee" and "precision: " in p.stdout
    scalars = read_scalars(str(out))
    for tag in ("losses/q_loss", "losses/v_loss", "losses/actor_loss", "eval/normalized_score",
                "eval/success_rate", "charts/SPS", "edis/diffusion_loss", "edis/energy_loss_state",
                "edis/energy_loss_policy", "edis/energy_loss_transition", "edis/energy_acc_state_sigma0-0.1",
                "edis/guidance_norm", "edis/syn_state_mean_dist", "charts/synthetic_fraction"):
        assert tag in scalars, tag
    # the paper's three energies guide (and train) at every noise level; the extras add the realism energy and
    # stop at sigma <= 5
    assert ("edis/energy_loss_realism" in scalars) == extras
    assert bool([t for t in scalars if t.startswith("edis/energy_acc_") and t.endswith("sigma5-80")]) != extras
    assert scalars["charts/synthetic_fraction"][-1] == pytest.approx(0.5)  # synthetic data is in the batches
    assert "offline phase done" in p.stderr + p.stdout


def test_no_edis_ablation_runs(tiny_pointmaze, tmp_path):
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--no-edis", "--online-steps", "120", "--output-dir", str(out)],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edis_retrains"] == 0 and summary["updates"] == 150 + 120


def test_extended_run_keeps_the_retrain_schedule(tiny_pointmaze, tmp_path):
    """A finished run extended with --resume --online-steps (the flags given override the saved ones) retrains on
    the same schedule as one run of the longer budget; kill-and-resume is tests/test_reliability.py's."""
    out = tmp_path / "run"
    args = [*SMOKE, "--edis-retrain-every", "100", "--online-steps", "200", "--eval-every", "10000",
            "--output-dir", str(out)]
    p = run_script(["edis_iql.py", *args], tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # one retrain at online step 100 (none at step 200: it is the last step, no update would use the samples)
    assert summary["updates"] == 150 + 200 and summary["online_env_steps"] == 200 and summary["edis_retrains"] == 1
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "300"], tiny_pointmaze, timeout=600)
    assert p.returncode == 0 and f"resumed {out} at step 350" in p.stdout, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 150 + 300 and summary["online_env_steps"] == 300 and summary["edis_retrains"] == 2


def test_checkpoint_of_another_format_is_refused_in_one_line(tiny_pointmaze, tmp_path):
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--offline-steps", "20", "--online-steps", "0", "--output-dir", str(out)],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == 4
    torch.save(dict(ckpt, format=3), out / "checkpoint.pt")
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "300"], tiny_pointmaze, timeout=600)
    assert p.returncode == 2 and "checkpoint format 3, this script reads format 4" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_extras_switch_may_change_on_resume_until_the_first_retrain(tiny_pointmaze, tmp_path):
    """One offline phase continued as both arms of study 2 (the energies exist only from the first retrain on);
    once they are trained --edis-extras is frozen, as are the networks' sizes."""
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--offline-steps", "20", "--online-steps", "0", "--output-dir", str(out)],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["edis"]["energies"] is None
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "150", "--edis-retrain-every", "100",
                    "--edis-extras"], tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["edis_retrains"] == 1
    assert "realism" in {k.split(".")[0] for k in torch.load(out / "checkpoint.pt", weights_only=True)["edis"][
        "energies"]}
    for flags, text in ((["--no-edis-extras"], "--edis-extras False (checkpoint: True) cannot change"),
                        (["--hidden-dim", "64"], "--hidden-dim 64 (checkpoint: 32) cannot change")):
        p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "300", *flags], tiny_pointmaze)
        assert p.returncode == 2 and text in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, text", [
    (["--offline-steps", "-5"], "--offline-steps must be >= 0"),
    (["--edis-ratio", "1.5"], "--edis-ratio must be in [0, 1)"),
    (["--resume", "/nonexistent/run"], "no checkpoint at"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_bad_flags_one_line_errors(flags, text, tiny_pointmaze):
    p = run_script(["edis_iql.py", "--env", "pointmaze-umaze", *flags], tiny_pointmaze)
    assert p.returncode == 2 and text in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
