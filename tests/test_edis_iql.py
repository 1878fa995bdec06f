"""edis_iql.py: IQL and EDIS math against hand-computed values and slow references, toys, smoke and resume runs."""

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
from tests.conftest import read_scalars, run_and_kill, run_script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def make_args(**kw):
    return m.make_args(env="antmaze-umaze", device="cpu", offline_steps=100, online_steps=0, **kw)


# ---------------------------------------------------------------------------------------------------------------
# IQL pieces
# ---------------------------------------------------------------------------------------------------------------
def test_expectile_loss_hand_value():
    u = torch.tensor([-2.0, 1.0, 3.0])
    # |tau - 1(u<0)| u^2 with tau = 0.7: weights 0.3, 0.7, 0.7
    assert m.expectile_loss(u, 0.7).item() == pytest.approx((0.3 * 4 + 0.7 * 1 + 0.7 * 9) / 3)
    assert m.expectile_loss(u, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 9) / 3)  # tau = 0.5: half the MSE


def test_awr_weights_hand_values():
    w = m.awr_weights(torch.tensor([0.0, 1.0, -1.0, 10.0]), beta=3.0, max_weight=100.0)
    np.testing.assert_allclose(w.numpy(), [1.0, math.exp(3.0), math.exp(-3.0), 100.0], rtol=1e-6)


def test_terminal_stops_bootstrap_timeout_does_not():
    # transition 0 ends in a true terminal; transition 1 ends by a timeout (stored with terminal = 0)
    r, next_v = torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0])
    terminals = torch.tensor([1.0, 0.0])
    np.testing.assert_allclose(m.td_target(r, terminals, next_v, 0.99).numpy(), [1.0, 1.0 + 0.99 * 5.0])


def slow_reference_update(agent, opts, batch, args):
    """CORL's order with three optimizers and three backward passes (V, then Q, then actor)."""
    opt_v, opt_q, opt_a = opts
    s, a, r, s2, d = (batch[k] for k in m.FIELDS)
    with torch.no_grad():
        tq = torch.min(agent.q_target(s, a), 0).values
        next_v = agent.vf(s2)
    v = agent.vf(s)
    adv = tq - v
    v_loss = torch.mean(torch.abs(args.expectile - (adv < 0).float()) * adv**2)
    opt_v.zero_grad()
    v_loss.backward()
    opt_v.step()
    target = r + args.gamma * (1 - d) * next_v
    q1, q2 = agent.qf(s, a)
    q_loss = (torch.nn.functional.mse_loss(q1, target) + torch.nn.functional.mse_loss(q2, target)) / 2
    opt_q.zero_grad()
    q_loss.backward()
    opt_q.step()
    w = torch.clamp(torch.exp(args.beta * adv.detach()), max=args.max_weight)
    logp = agent.actor.dist(s).log_prob(a).sum(-1)
    actor_loss = torch.mean(-w * logp)
    opt_a.zero_grad()
    actor_loss.backward()
    opt_a.step()
    with torch.no_grad():
        for tp, p in zip(agent.q_target.parameters(), agent.qf.parameters()):
            tp.mul_(1 - args.tau).add_(args.tau * p)
    return v_loss, q_loss, actor_loss


def random_batch(n=64, obs=5, act=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(n, obs, generator=g), "actions": torch.rand(n, act, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_observations": torch.randn(n, obs, generator=g),
            "terminals": (torch.rand(n, generator=g) < 0.2).float()}


def run_steps(update_args, reference, steps=3):
    """The script's update (with ``update_args``) and ``reference`` (agent, batch -> losses) from the same init."""
    torch.manual_seed(0)
    agent = m.Agent(5, 2, update_args, 1.0)
    ref = copy.deepcopy(agent)
    opts = m.make_optimizers(agent, update_args)
    for step in range(steps):  # several steps, so Adam's moment estimates are compared too
        batch = random_batch(seed=step)
        out = m.iql_update(agent, opts, batch, update_args)
        v_loss, q_loss, actor_loss = reference(ref, batch)
        assert out["losses/v_loss"].item() == pytest.approx(v_loss.item(), rel=1e-5)
        assert out["losses/q_loss"].item() == pytest.approx(q_loss.item(), rel=1e-5)
        assert out["losses/actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
    for (name, p1), p2 in zip(agent.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


def test_textbook_update_equals_a_slow_reference():
    """The default (textbook) update == CORL's order written out here with plain torch.optim.Adam."""
    args = make_args(hidden_dim=32)
    ref_opts = {}

    def reference(ref, batch):
        if not ref_opts:
            ref_opts["o"] = (torch.optim.Adam(ref.vf.parameters(), lr=args.critic_lr),
                             torch.optim.Adam(ref.qf.parameters(), lr=args.critic_lr),
                             torch.optim.Adam(ref.actor.parameters(), lr=args.actor_lr))
        return slow_reference_update(ref, ref_opts["o"], batch, args)

    run_steps(args, reference)


def test_fused_update_equals_the_textbook_update():
    """--fused-update (one backward of the summed losses, one Adam over three groups) == the textbook update."""
    fused, textbook = make_args(hidden_dim=32, fused_update=True), make_args(hidden_dim=32)
    opts = {}

    def reference(ref, batch):
        opts.setdefault("o", m.make_optimizers(ref, textbook))
        out = m.iql_update(ref, opts["o"], batch, textbook)
        return out["losses/v_loss"], out["losses/q_loss"], out["losses/actor_loss"]

    run_steps(fused, reference)


@pytest.mark.parametrize("fused", [False, True])
def test_every_trainable_parameter_changes(fused):
    args = make_args(hidden_dim=32, fused_update=fused)
    agent = m.Agent(5, 2, args, 1.0)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    m.iql_update(agent, m.make_optimizers(agent, args), random_batch(), args)
    after = agent.state_dict()
    for k in before:
        assert not torch.equal(before[k], after[k]), f"{k} did not change"


@pytest.mark.parametrize("n_hidden", [1, 2, 5])
def test_batched_twin_q_equals_the_two_plain_critics(n_hidden):
    """--fused-update's batched critic forward (one bmm per layer for both critics, the first layer's state half
    shared by a state's actions) gives the plain critics' values and gradients; the critics have their own weights."""
    torch.manual_seed(0)
    q = m.TwinQ(5, 2, 16, n_hidden)
    s, acts = torch.randn(7, 5), torch.randn(7, 3, 2)
    plain = q.forward_multi(s, acts)  # [2, 7, 3]
    grads_plain = torch.autograd.grad(plain.square().sum(), list(q.parameters()))
    q.batched = True
    batched = q.forward_multi(s, acts)
    grads_batched = torch.autograd.grad(batched.square().sum(), list(q.parameters()))
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(grads_batched, grads_plain):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    for i, member in enumerate((q.q1, q.q2)):  # member i, one state-action pair at a time
        for n in range(3):
            torch.testing.assert_close(plain[i, :, n], member(torch.cat([s, acts[:, n]], -1))[:, 0])
    torch.testing.assert_close(q(s, acts[:, 0]), plain[..., 0])
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


def test_input_features_are_the_sin_cos_octaves_of_each_dimension():
    """InputFeatures against the formula written out element by element; octaves = 0 is the raw input, so the
    default networks keep their old shapes (and checkpoints load)."""
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(m.InputFeatures(0)(x), x)
    feats = m.InputFeatures(4).double()
    y = feats(x)
    assert y.shape == (5, feats.out_dim(3)) == (5, 3 * 9)
    for i in range(5):
        expected = list(x[i])
        for fn in (math.sin, math.cos):
            expected += [fn(2.0**k * math.pi * float(x[i, j])) for j in range(3) for k in range(4)]
        assert torch.allclose(y[i], torch.tensor(expected, dtype=torch.float64), atol=1e-5)  # float32 pi in freq
    plain, with_feats = m.ResidualMLPDenoiser(6, 16, 1), m.ResidualMLPDenoiser(6, 16, 1, octaves=3)
    assert plain.inp.in_features == 12 and with_feats.inp.in_features == 6 * 7 + 6
    assert "features.freq" not in m.EnergyNet(6, 8, octaves=3).state_dict()  # not a learned or saved tensor
    x6 = torch.randn(4, 6)
    assert with_feats(x6, torch.zeros(4, 6), torch.zeros(4)).shape == (4, 6)
    assert m.EnergyNet(6, 8, octaves=3)(x6, torch.full((4,), 0.5)).shape == (4,)
    proj = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]], dtype=torch.float64)  # features of u = P x
    y = m.InputFeatures(2, proj).double()(x)
    assert y.shape == (5, 3 + 2 * 2 * 2)
    for i in range(5):
        u = [0.5 * float(x[i, 0] + x[i, 2]), float(x[i, 1])]
        expected = list(x[i]) + [fn(2.0**k * math.pi * u[j]) for fn in (math.sin, math.cos) for j in range(2)
                                  for k in range(2)]
        assert torch.allclose(y[i], torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    assert torch.equal(m.InputFeatures(3, torch.zeros(0, 3))(x.float()), x.float())  # no rows: the raw input


def test_energy_features_of_the_midpoint_translate_a_transition():
    """--energy-octave-dims: which projections of the transition the energies' features see. midpoint:
    ((x + x')/2, (y + y')/2) of the maze position, so each feature's gradient is the same for s and s' and the
    features' guidance moves the transition as a whole (its step s' - s unchanged); midpoint+position (the default)
    adds x, x', y, y' apart at 16x lower frequencies; none outside mazes."""
    codec = m.TransitionCodec(6, 2, torch.device("cpu"))  # PointMaze: s = (x, y, vx, vy, gx, gy)
    rows = {d: m.energy_feature_proj(m.make_args(env="pointmaze-umaze", device="cpu", energy_octave_dims=d), codec)
            for d in ("midpoint", "position", "midpoint+position", "all")}
    x_, y_, x2, y2 = codec.s.start, codec.s.start + 1, codec.s2.start, codec.s2.start + 1
    assert rows["all"] is None
    assert rows["midpoint"].shape == (2, codec.dim) and rows["position"].shape == (4, codec.dim)
    assert rows["midpoint"][0, x_] == rows["midpoint"][0, x2] == 0.5 and rows["midpoint"][1, y_] == 0.5
    assert rows["midpoint"].sum() == 2.0 and rows["position"].sum() == 4.0
    assert rows["position"][:, [x_, x2, y_, y2]].equal(torch.eye(4))  # rows: x, x', y, y'
    # midpoint+position: the midpoint's rows, then x, x', y, y' with frequencies 2^POSITION_COARSENING times lower
    coarse = rows["position"] * 2.0**-m.POSITION_COARSENING
    assert rows["midpoint+position"].equal(torch.cat([rows["midpoint"], coarse])) and coarse.max() == 1 / 16
    hopper = m.energy_feature_proj(m.make_args(env="hopper-medium", device="cpu"), m.TransitionCodec(11, 3, "cpu"))
    assert hopper.shape == (0, 2 * 11 + 3 + 2)  # no maze: no features, the energies see the raw transition
    assert m.EnergyNet(2 * 11 + 3 + 2, 8, 8, hopper).net[0].in_features == 2 * 11 + 3 + 2 + 1
    feats = m.InputFeatures(6, rows["midpoint"])
    x = torch.randn(4, codec.dim)
    jac = torch.autograd.functional.jacobian(lambda v: feats(v, noise_std=torch.full((4,), 0.01))[:, codec.dim:], x)
    jac = jac.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [row, feature, input dim]
    assert jac.abs().sum() > 0
    assert torch.equal(jac[..., x_], jac[..., x2]) and torch.equal(jac[..., y_], jac[..., y2])
    others = [i for i in range(codec.dim) if i not in (x_, y_, x2, y2)]
    assert jac[..., others].abs().max() == 0


def test_noisy_input_features_are_the_expected_features_under_the_noise():
    """InputFeatures(x, noise_std) against a Monte-Carlo average of the plain features of x + noise, and the bound on
    its input gradient that keeps guidance finite at every sigma."""
    torch.manual_seed(0)
    feats = m.InputFeatures(5).double()
    x, std = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.01, 0.1, 0.5], dtype=torch.float64)
    noisy = x[None] + std[None, :, None] * torch.randn(50_000, 3, 2, dtype=torch.float64)
    mc = feats(noisy.reshape(-1, 2)).view(50_000, 3, -1).mean(0)
    assert torch.allclose(feats(x, noise_std=std), mc, atol=1.5e-2)  # MC error ~ 0.7 / sqrt(50,000)
    assert torch.equal(feats(x, noise_std=torch.zeros(3, dtype=torch.float64)), feats(x))
    xg = x.clone().requires_grad_(True)
    grads = torch.autograd.functional.jacobian(lambda v: feats(v, noise_std=std)[:, 2:], xg)  # the features only
    for i in range(3):
        assert grads[i, :, i].abs().max() <= 1 / (float(std[i]) * math.sqrt(math.e)) + 1e-9
    # a projection u = P x: u_j's noise has std |P_j| noise_std, and its features are damped by that
    proj = torch.tensor([[0.5, 0.5], [3.0, 0.0]], dtype=torch.float64)
    pf = m.InputFeatures(5, proj).double()
    mc = pf(noisy.reshape(-1, 2)).view(50_000, 3, -1).mean(0)
    assert torch.allclose(pf(x, noise_std=std), mc, atol=1.5e-2)


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


@pytest.fixture(scope="module")
def toy_denoiser():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    args = make_args(edis_width=64, edis_depth=2, edis_diffusion_steps=1500, edis_diffusion_batch=256,
                     edis_diffusion_lr=3e-3, edis_sample_steps=24, edis_ema=0.99)
    data = two_mode_data(4000, g)
    ema, losses = m.train_diffusion(data, args, g)
    return ema, losses, args


def test_denoiser_loss_decreases_on_2d_toy(toy_denoiser):
    net, losses, args = toy_denoiser
    data = two_mode_data(4000, torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    fresh = m.ResidualMLPDenoiser(2, args.edis_width, args.edis_depth)
    with torch.no_grad():  # the same noise draws for both networks
        trained = m.edm_loss(net, data, torch.Generator().manual_seed(10)).item()
        untrained = m.edm_loss(fresh, data, torch.Generator().manual_seed(10)).item()
    assert trained < 0.7 * untrained
    assert losses[-200:].mean() < losses[:20].mean()


def test_sampler_reproduces_both_modes(toy_denoiser):
    net, _, args = toy_denoiser
    x = m.edm_sample(net, 2000, 2, args.edis_sample_steps, torch.Generator().manual_seed(1))
    right = (x[:, 0] > 0).float().mean().item()
    assert 0.35 < right < 0.65  # both modes, roughly equally
    assert (x[:, 0].abs() - 2).abs().median().item() < 0.5  # samples sit on the modes


def contact_line_data(n, g):
    """2-D toy of a ball that often rests against a wall: half the points sit exactly on the contact line x = 0.9
    (the wall is beyond it), the rest spread uniformly over x in [-1, 0.9); y uniform in [-1, 1]."""
    x = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(0.9), torch.rand(n, generator=g) * 1.9 - 1.0)
    return torch.stack([x, torch.rand(n, generator=g) * 2 - 1], -1)


def test_input_octaves_sharpen_a_contact_line():
    """The mechanism of --edis-octaves: with sin/cos input features the same denoiser, trained the same way, puts
    more of its samples on the contact line and fewer beyond it (measured over seeds 0-2: within 0.005 of the line
    20-22 % of samples without octaves, 31-37 % with 6; beyond 0.905, 17-24 % vs 9-12 %)."""
    out = {}
    for octaves in (0, 6):
        g = torch.Generator().manual_seed(1)
        args = make_args(edis_width=64, edis_depth=2, edis_diffusion_steps=1500, edis_diffusion_batch=256,
                         edis_diffusion_lr=3e-3, edis_sample_steps=24, edis_ema=0.99, edis_octaves=octaves)
        net, _ = m.train_diffusion(contact_line_data(4000, g), args, g)
        x = m.edm_sample(net, 4000, 2, args.edis_sample_steps, torch.Generator().manual_seed(11))
        out[octaves] = ((x[:, 0] - 0.9).abs() < 0.005).float().mean().item(), (x[:, 0] > 0.905).float().mean().item()
    (on_plain, beyond_plain), (on_oct, beyond_oct) = out[0], out[6]
    assert on_oct > 1.3 * on_plain, out
    assert beyond_oct < 0.75 * beyond_plain, out
    assert 0.3 < on_oct < 0.6, out  # about the half of the data that is on the line, not more


def test_zero_guidance_reproduces_unguided_exactly(toy_denoiser):
    net, _, args = toy_denoiser
    a = m.edm_sample(net, 64, 2, args.edis_sample_steps, torch.Generator().manual_seed(5))
    b = m.edm_sample(net, 64, 2, args.edis_sample_steps, torch.Generator().manual_seed(5),
                     guidance=lambda x, s: torch.zeros_like(x))
    assert torch.equal(a, b)
    # guidance restricted to sigma <= 1e-4 (below the schedule's smallest sigma) is no guidance at all
    c = m.edm_sample(net, 64, 2, args.edis_sample_steps, torch.Generator().manual_seed(5),
                     guidance=lambda x, s: torch.ones_like(x), guide_sigma_max=1e-4)
    assert torch.equal(a, c)
    energies = m.make_energies(4, m.ENERGY_DESIGNS["factored"], 8, torch.device("cpu"))
    assert m.make_guidance(energies, {"state": 0.0, "policy": 0.0, "transition": 0.0}) is None


def test_guidance_is_the_full_gradient_of_the_weighted_energies():
    """CEP's noisy energy depends on the whole noisy transition: guidance is grad_x sum_k w_k E_k over every
    dimension (no block masks), checked against finite differences."""
    torch.manual_seed(0)
    energies = m.make_energies(5, m.ENERGY_DESIGNS["factored"], 16, torch.device("cpu")).double()
    weights = {"state": 0.5, "policy": 2.0, "transition": -1.0}
    guidance = m.make_guidance(energies, weights)
    x, sigma = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    g = guidance(x, sigma)
    total = lambda y: sum(w * energies[k](y, sigma).sum() for k, w in weights.items())  # noqa: E731
    eps = 1e-6
    for j in range(5):
        e = torch.zeros_like(x)
        e[:, j] = eps
        fd = [(total(x + e * (torch.arange(3) == i)[:, None]) - total(x - e * (torch.arange(3) == i)[:, None]))
              / (2 * eps) for i in range(3)]
        torch.testing.assert_close(g[:, j], torch.stack(fd), rtol=1e-5, atol=1e-7)
    assert (g.abs() > 0).all()  # every block is moved, the reward and terminal too


def test_conditional_sampling_keeps_given_block_fixed(toy_denoiser):
    net, _, args = toy_denoiser
    known = torch.tensor([[1.5, 0.7]]).repeat(32, 1)
    mask = torch.tensor([1.0, 0.0])
    x = m.edm_sample(net, 32, 2, args.edis_sample_steps, torch.Generator().manual_seed(2), known=known,
                     known_mask=mask)
    assert torch.equal(x[:, 0], known[:, 0])  # exactly the condition
    assert not torch.equal(x[:, 1], known[:, 1])  # the free block is sampled


def test_ema_warm_up():
    assert m.ema_decay(0, 0.999) == 0.0  # the first EMA step copies the network
    assert m.ema_decay(7, 0.999) == pytest.approx(1 - 8 ** (-2 / 3))  # 0.75 after 8 steps
    assert m.ema_decay(10**6, 0.999) == 0.999  # capped at --edis-ema
    init_weight = math.prod(m.ema_decay(step, 0.999) for step in range(3000))  # of the random init, in the EMA
    assert init_weight == 0.0  # (a constant decay of 0.999 would keep 0.999^3000 = 5 % of it)


def test_infonce_guidance_moves_samples_to_target(toy_denoiser):
    """Prior: both modes. Target: the right mode only. An energy trained by InfoNCE (positives from the target,
    negatives from the diffusion prior, at the sampler's noise levels) must steer guided samples to the right."""
    net, _, args = toy_denoiser
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    energy = m.EnergyNet(2, 64)
    opt = torch.optim.Adam(energy.parameters(), lr=3e-3)
    target = two_mode_data(4000, g)
    target = target[target[:, 0] > 0]
    prior = m.edm_sample(net, 2000, 2, args.edis_sample_steps, g)
    sigmas = m.karras_sigmas(args.edis_sample_steps, torch.device("cpu"))[:-1]
    K = 8
    for _ in range(1500):
        pos = target[torch.randint(0, len(target), (128,), generator=g)]
        neg = prior[torch.randint(0, len(prior), (128, K), generator=g)]
        sigma = sigmas[torch.randint(0, len(sigmas), (128,), generator=g)]
        loss, acc = m.infonce_loss(energy, pos, neg, sigma, g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def guidance(x, sigma):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(energy(x, sigma).sum(), x)[0]

    unguided = m.edm_sample(net, 1000, 2, args.edis_sample_steps, torch.Generator().manual_seed(4))
    guided = m.edm_sample(net, 1000, 2, args.edis_sample_steps, torch.Generator().manual_seed(4), guidance=guidance)
    frac = lambda x: (x[:, 0] > 0).float().mean().item()  # noqa: E731
    assert frac(unguided) < 0.65
    assert frac(guided) > 0.85 and frac(guided) > frac(unguided) + 0.25
    assert (guided[:, 0] - 2).abs().median().item() < 0.5  # and they land on the target mode


def test_energy_names_and_diffusion_batch_rows():
    assert m.energy_names(make_args()) == ("state", "policy", "transition", "realism")
    assert m.energy_names(make_args(guide_realism=0.0)) == ("state", "policy", "transition")  # the paper's three
    assert m.energy_names(make_args(edis_energies="joint", guide_realism=0.0)) == ("online",)
    g = torch.Generator().manual_seed(0)
    rows = m.diffusion_rows(1000, 100, 20_000, make_args(edis_online_frac=0.5), g, torch.device("cpu"))
    assert (rows >= 900).float().mean().item() == pytest.approx(0.5, abs=0.02)  # online rows are the last 100
    rows = m.diffusion_rows(1000, 100, 20_000, make_args(edis_online_frac=0.0), g, torch.device("cpu"))
    assert (rows >= 900).float().mean().item() == pytest.approx(0.1, abs=0.01)  # uniform over all rows
    assert rows.min() >= 0 and rows.max() < 1000


def test_contrastive_sets_of_every_energy():
    """Each energy's positives and negatives (shapes, and the ones that are real rows, exactly those rows)."""
    codec = m.TransitionCodec(2, 1, torch.device("cpu"))
    args = make_args(edis_sample_steps=2, edis_sample_batch=1000)
    net = m.ResidualMLPDenoiser(codec.dim, 8, 1)
    M, K, D = 6, 3, codec.dim
    g = torch.Generator().manual_seed(0)
    x_on, x_pi, x_data = torch.randn(M, D, generator=g), torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)
    names = m.ENERGY_DESIGNS["factored"] + ("realism",)
    with torch.no_grad():
        sets = m.contrastive_sets(names, net, codec, x_on, x_pi, x_data, K, args, g)
    assert set(sets) == set(names)
    for pos, neg in sets.values():
        assert pos.shape == (M, D) and neg.shape == (M, K, D)
    assert torch.equal(sets["transition"][0], x_on) and torch.equal(sets["realism"][0], x_data)
    sa = codec.mask(codec.s, codec.a).bool()
    assert torch.equal(sets["transition"][1][:, :, sa], x_on[:, None, sa].expand(M, K, -1))  # the real (s, a) given
    assert torch.equal(sets["policy"][0][:, sa], x_pi[:, sa])  # the policy's action at the online state
    assert torch.equal(sets["state"][0][:, codec.s], x_on[:, codec.s])
    with torch.no_grad():
        joint = m.contrastive_sets(("online",), net, codec, x_on, x_pi, x_data, K, args, g)
    assert set(joint) == {"online"} and torch.equal(joint["online"][0], x_on)


def test_sequential_sampler_keeps_the_first_pass_state_action():
    """--edis-sampler sequential: (s, a) come from a joint pass, (r, s', d) from the conditional denoiser given them.
    Unguided, with the same generator, its (s, a) are exactly those of a plain joint pass."""
    codec = m.TransitionCodec(2, 1, torch.device("cpu"))
    args = make_args(edis_sample_steps=4, edis_sampler="sequential")
    torch.manual_seed(0)
    state = m.new_edis_state(2, 1, args, torch.device("cpu"))
    net = m.ResidualMLPDenoiser(codec.dim, 16, 1)
    with torch.no_grad():
        seq = m.generate(state, net, 50, args, torch.Generator().manual_seed(1), guided=False)
        joint = m.sample_chunked(net, 50, codec.dim, args, torch.Generator().manual_seed(1))
    sa = codec.mask(codec.s, codec.a).bool()
    assert torch.equal(seq[:, sa], joint[:, sa])
    assert not torch.allclose(seq[:, ~sa], joint[:, ~sa])  # the rest was generated again, given (s, a)
    assert m.needs_conditionals(args) and not m.needs_conditionals(make_args(edis_energies="joint"))


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
    masks = codec.cond_masks()
    assert masks.tolist() == [[0] * 10, [1] * 3 + [0] * 7, [1] * 5 + [0] * 5]  # none, s, (s, a)


@pytest.mark.parametrize("design,sampler", [("factored", "joint"), ("joint", "joint"), ("factored", "sequential")])
def test_guidance_on_point_mass_toy(design, sampler):
    """A 2-D point mass with a wall and a goal (benchmarks/toy_pointmass.py; known dynamics): the script's EDIS
    functions fit the prior on offline + online data and train the energies; then, against unguided samples from the
    same noise, guided samples must be closer to the online states, no less physically consistent (dynamics error
    and states inside the wall not above unguided), and closer to the current policy's actions. With the factored
    energies, the conditional sampler's (r, s', d) given real (s, a) must have a dynamics error within 1.5x of joint
    samples (replacement in-painting had ~10x). The sequential sampler (guided (s, a), then (r, s', d) from the
    conditional denoiser) must pass the same checks against its own unguided samples."""
    toy = importlib.import_module("toy_pointmass")
    args = toy.toy_args(edis_energies=design, edis_sampler=sampler, edis_diffusion_steps=1500, energy_steps=300,
                        energy_pool=256, guide_sigma_max=80.0)
    r = toy.run(1, args, n_eval=1000)
    u, g = r["unguided"], r["guided"]
    assert g["nn_dist_to_online"] < 0.5 * u["nn_dist_to_online"]
    assert g["dynamics_error"] <= u["dynamics_error"]
    assert g["states_in_wall"] <= u["states_in_wall"]
    assert g["policy_action_error"] < 0.7 * u["policy_action_error"]
    assert r["online_real"]["dynamics_error"] < 1e-6  # the measurement itself: real transitions are exact
    if design == "factored":
        assert r["conditional_given_sa"]["dynamics_error"] <= 1.5 * u["dynamics_error"]


# ---------------------------------------------------------------------------------------------------------------
# Script runs: smoke (offline + online updates, EDIS retrain, eval, checkpoint, summary) and resume
# ---------------------------------------------------------------------------------------------------------------
SMOKE = ["--env", "pointmaze-umaze", "--offline-steps", "150", "--online-steps", "260", "--eval-every", "100",
         "--eval-episodes", "1", "--edis-retrain-every", "120", "--edis-diffusion-steps", "60",
         "--edis-num-samples", "400", "--edis-width", "32", "--edis-depth", "2", "--edis-sample-steps", "6",
         "--energy-pool", "16", "--energy-negatives", "4", "--energy-steps", "5", "--log-every", "50",
         "--checkpoint-every", "100", "--hidden-dim", "32", "--batch-size", "32", "--device", "cpu"]


def test_smoke_run_reaches_every_stage(tiny_pointmaze, tmp_path):
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--edis-offline-frac", "0.25", "--output-dir", str(out)], tiny_pointmaze,
                   timeout=600)  # (offline rows kept in the EDIS batches: the path the default does not take)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 150 + 260  # every offline and every online step did a gradient update
    assert summary["online_env_steps"] == 260 and summary["edis_retrains"] == 2  # retrains at 120 and 240
    for k in ("env", "seed", "offline_normalized_score", "final_normalized_score", "wall_time_s"):
        assert summary[k] is not None
    assert (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    scalars = read_scalars(str(out))
    for tag in ("losses/q_loss", "losses/v_loss", "losses/actor_loss", "eval/normalized_score",
                "eval/success_rate", "charts/SPS", "edis/diffusion_loss", "edis/energy_loss_state",
                "edis/energy_loss_policy", "edis/energy_loss_transition", "edis/energy_loss_realism",
                "edis/energy_acc_realism_sigma0-0.1", "edis/guidance_norm",
                "edis/syn_state_mean_dist", "charts/synthetic_fraction"):
        assert tag in scalars, tag
    # the energies train (and are scored) only at the levels guidance uses: sigma <= --guide-sigma-max (5)
    assert not [t for t in scalars if t.startswith("edis/energy_acc_") and t.endswith("sigma5-80")]
    assert scalars["charts/synthetic_fraction"][-1] == pytest.approx(0.5)  # synthetic data is in the batches
    assert "offline phase done" in p.stderr + p.stdout


def test_no_edis_ablation_runs(tiny_pointmaze, tmp_path):
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--no-edis", "--online-steps", "120", "--output-dir", str(out)],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edis_retrains"] == 0 and summary["updates"] == 150 + 120


def test_kill_and_resume(tiny_pointmaze, tmp_path):
    out = tmp_path / "run"
    offline = 3000  # offline updates: a run of a few seconds, so the poll below catches it alive after checkpoint 2
    args = [*SMOKE, "--edis-retrain-every", "100", "--offline-steps", str(offline), "--online-steps", "200",
            "--eval-every", "10000", "--output-dir", str(out)]
    step_at_kill = run_and_kill(["edis_iql.py", *args], tiny_pointmaze, out / "checkpoint.pt", past_step=199)
    assert 200 <= step_at_kill < offline + 200 and not (out / "summary.json").exists()
    p = run_script(["edis_iql.py", "--resume", str(out)], tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed {out} at step {step_at_kill}" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    # one retrain at online step 100 (none at step 200: it is the last step, no update would use the samples)
    assert summary["updates"] == offline + 200 and summary["online_env_steps"] == 200 and summary["edis_retrains"] == 1
    # and a finished run can be extended: the flags given with --resume override the saved ones
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "300"], tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == offline + 300 and summary["online_env_steps"] == 300 and summary["edis_retrains"] == 2


def test_resume_of_checkpoint_with_other_networks_is_one_line(tiny_pointmaze, tmp_path):
    """A checkpoint of an older version (block energies, or ensemble critics) is refused in one line."""
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--offline-steps", "20", "--online-steps", "0", "--output-dir", str(out)],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    energies = ckpt["edis"]["energies"]
    ckpt["edis"]["energies"] = m.make_energies(5, m.ENERGY_DESIGNS["factored"], 8, torch.device("cpu")).state_dict()
    torch.save(ckpt, out / "checkpoint.pt")
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "300"], tiny_pointmaze, timeout=600)
    assert p.returncode == 2 and "EDIS energies do not fit" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # and one of the older version whose twin critics were one ensemble module (qf.net.* instead of qf.q1/q2.*)
    ckpt["edis"]["energies"] = energies
    ckpt["agent"] = {k.replace(".q1.", ".net."): v for k, v in ckpt["agent"].items() if ".q2." not in k}
    torch.save(ckpt, out / "checkpoint.pt")
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "300"], tiny_pointmaze, timeout=600)
    assert p.returncode == 2 and "networks do not fit" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_checkpoint_of_a_version_before_the_octave_flags_resumes_as_written(tiny_pointmaze, tmp_path):
    """Checkpoints written before --edis-octaves / --energy-octaves / --energy-octave-dims existed lack them: they
    resume with the values that rebuild their networks (0 octaves, raw input; ADDED_FLAGS), not with today's
    defaults (8 octaves of the midpoint and coarser positions for the energies), whose networks would not fit
    their weights."""
    assert m.Args().energy_octaves != m.ADDED_FLAGS["energy_octaves"]  # else this test could not fail
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--offline-steps", "20", "--online-steps", "0", "--energy-octaves", "0",
                    "--energy-octave-dims", "all", "--output-dir", str(out)], tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k in ("energy_octaves", "edis_octaves", "energy_octave_dims"):
        ckpt["args"].pop(k)
    torch.save(ckpt, out / "checkpoint.pt")
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "150", "--edis-retrain-every", "100"],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    args = json.loads((out / "config.json").read_text())["args"]
    assert (args["energy_octaves"], args["edis_octaves"], args["energy_octave_dims"]) == (0, 0, "all")
    assert json.loads((out / "summary.json").read_text())["edis_retrains"] == 1


def test_untrained_energies_may_change_design_on_resume(tiny_pointmaze, tmp_path):
    """An offline phase (no EDIS retrain yet, energies untrained) can be continued with another energy design (what
    study 2b does to compare designs from one offline agent); once the energies are trained, their design is fixed."""
    out = tmp_path / "run"
    p = run_script(["edis_iql.py", *SMOKE, "--offline-steps", "20", "--online-steps", "0", "--energy-octave-dims",
                    "midpoint", "--output-dir", str(out)], tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "150", "--edis-retrain-every", "100",
                    "--energy-octave-dims", "position", "--energy-hidden", "16"], tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "built afresh from the flags given now" in p.stdout
    args = json.loads((out / "config.json").read_text())["args"]
    assert (args["energy_octave_dims"], args["energy_hidden"]) == ("position", 16)
    assert json.loads((out / "summary.json").read_text())["edis_retrains"] == 1
    # the energies the checkpoint now holds have the shapes of a run started with the new flags
    fresh = tmp_path / "fresh"
    p = run_script(["edis_iql.py", *SMOKE, "--offline-steps", "20", "--online-steps", "0", "--energy-octave-dims",
                    "position", "--energy-hidden", "16", "--output-dir", str(fresh)], tiny_pointmaze, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    shapes = [{k: v.shape for k, v in torch.load(d / "checkpoint.pt", weights_only=True)["edis"]["energies"].items()}
              for d in (out, fresh)]
    assert shapes[0] == shapes[1]
    p = run_script(["edis_iql.py", "--resume", str(out), "--online-steps", "300", "--energy-octave-dims", "midpoint"],
                   tiny_pointmaze, timeout=600)
    assert p.returncode == 2 and "--energy-octave-dims midpoint (checkpoint: position) cannot change" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, text", [
    (["--offline-steps", "-5"], "--offline-steps must be >= 0"),
    (["--edis-ratio", "1.5"], "--edis-ratio must be in [0, 1)"),
    (["--edis-ratio", "0.6", "--edis-offline-frac", "0.4"], "--edis-offline-frac 0.4 must be < 1"),
    (["--resume", "/nonexistent/run"], "no checkpoint at"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_bad_flags_one_line_errors(flags, text, tiny_pointmaze):
    p = run_script(["edis_iql.py", "--env", "pointmaze-umaze", *flags], tiny_pointmaze)
    assert p.returncode == 2 and text in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
