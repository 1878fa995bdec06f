# edis_iql.py: IQL offline pre-training, then online fine-tuning with EDIS. Docs: docs/edis_iql.md
# IQL: Kostrikov et al., arXiv 2110.06169. EDIS: Liu et al., ICML 2024, arXiv 2407.12448 (official code
# liuxhym/EDIS). EDM: Karras et al., arXiv 2206.00364. IQL details follow CORL's algorithms/finetune/iql.py.
# Layout, as edis_calql.py (`diff edis_iql.py edis_calql.py` shows only the algorithm): Args and presets, buffers,
# networks, ALGO LOGIC: IQL, ALGO LOGIC: EDIS, NOT IN THE PAPER: --edis-extras, checkpoint, main. `# >>> shared`
# blocks are identical in both (tests/test_edis_shared.py). Copying it: utils/__init__.py, utils/common.py,
# utils/run.py (harness), utils/tasks.py (envs, evaluation), utils/offline_data.py, utils/collect.py go with it.
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import run as harness  # run folder, presets, checkpoint files, flag ranges
from utils.common import (
    Logger,
    UserError,
    check_finite,
    check_finite_params,
    get_rng_state,
    make_output_dir,
    run_cli,
    seed_everything,
    set_rng_state,
)
from utils.offline_data import load_offline_data, normalization
from utils.tasks import evaluate, get_task, make_env, normalized_score


# >>> shared:args_common
@dataclasses.dataclass
class Args:
    # Defaults: pointmaze-umaze on CPU; presets set those of other tasks and devices (`--env X --help` shows them)
    env: str = "pointmaze-umaze"
    """task: antmaze-large, pen-human, hopper-medium, pointmaze-umaze, ... (docs/data.md)"""
    seed: int = 1
    """seed of python, numpy, torch, the envs and the batches"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N; selects the device preset (GPU or CPU scale)"""
    torch_deterministic: bool = True
    """set torch.backends.cudnn.deterministic"""
    output_dir: Optional[str] = None
    """the run folder (default runs/<env>__<script>__<seed>__<time>)"""
    resume: Optional[str] = None
    """a run folder (or checkpoint.pt) to continue; flags given with it override the saved ones"""
    overwrite: bool = False
    """start afresh in an --output-dir holding an earlier run, deleting it"""
    dataset_path: Optional[str] = None
    """a D4RL hdf5 file or a Minari dataset folder instead of the task's dataset"""
    track: bool = False
    """also log to Weights & Biases"""
    wandb_project_name: str = "reference-rl"
    """W&B project (with --track)"""
    wandb_entity: Optional[str] = None
    """W&B entity (with --track)"""
    bf16: bool = False
    """bfloat16 autocast, fp32 weights (preset: on for bf16 GPUs)"""
    tf32: bool = True
    """TF32 for fp32 matmuls on CUDA GPUs (no effect on CPU); --no-tf32: full fp32"""
    # --- budget, evaluation, logging ---
    offline_steps: int = 20_000
    """updates on the offline dataset (GPU preset: 1M)"""
    online_steps: int = 20_000
    """env steps of online fine-tuning (GPU preset: 200k, as EDIS)"""
    utd: int = 1
    """online updates per environment step"""
    eval_every: int = 5000
    """evaluate every this many steps (updates offline, env steps online) and after each phase"""
    eval_episodes: int = 5
    """episodes per evaluation (preset: AntMaze 100, else 10; CPU 5)"""
    checkpoint_every: int = 10_000
    """write checkpoint.pt every this many steps and after each phase"""
    log_every: int = 1_000
    """log losses to TensorBoard every this many updates"""
    capture_video: bool = False
    """record each evaluation's first episode as an mp4 in <output-dir>/videos"""
    eval_only: bool = False
    """with --resume: evaluate the checkpoint into eval.json, no training"""
    batch_size: int = 256
    """transitions per gradient update"""
    # --- EDIS (Liu et al. 2024) ---
    edis: bool = True
    """use EDIS online; --no-edis: plain fine-tuning (the ablation)"""
    edis_extras: bool = False
    """NOT IN THE PAPER: add what our studies showed to help (EXTRAS below)"""
    edis_ratio: float = 0.5
    """fraction of synthetic transitions in every online batch (the rest are online)"""
    edis_retrain_every: int = 5000
    """retrain diffusion and energies, regenerate synthetic data, every this many env steps"""
    edis_num_samples: int = 20_000
    """synthetic transitions per retrain (they replace the previous ones)"""
    edis_diffusion_steps: int = 12_000
    """training steps of each (fresh) diffusion model"""
    edis_width: int = 256
    """width of the residual-MLP denoiser (preset: 1024 on GPU, as the paper)"""
    edis_depth: int = 3
    """residual blocks of the denoiser (preset: 6 on GPU, as the paper)"""
    edis_sample_steps: int = 32
    """Heun steps of the EDM sampler (preset: 128 on GPU, as the paper)"""
    guide_state: float = 1.0
    """weight of the state energy E_s; 1: the target p exp(-E)"""
    guide_policy: float = 1.0
    """weight of the policy energy E_pi"""
    guide_transition: float = 1.0
    """weight of the transition energy E_T"""
    energy_negatives: int = 10
    """K: negatives per positive in InfoNCE"""
    energy_pool: int = 2048
    """online positives per retrain, K negatives each (preset: GPU 4096)"""
    energy_steps: int = 100
    """InfoNCE steps per retrain (the energies persist across retrains)"""
    # --- networks ---
    hidden_dim: int = 256
    """width of the actor and critic MLPs"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
# <<< shared:args_common
    # --- IQL ---
    expectile: float = 0.9
    """expectile tau of the value loss, Eq. 5 (preset: AntMaze 0.9, Adroit 0.8, locomotion 0.7)"""
    beta: float = 10.0
    """inverse temperature of the actor's advantage weights, Eq. 7 (preset: AntMaze 10, else 3)"""
    critic_lr: float = 3e-4
    """Adam learning rate of Q and V"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor (cosine decay offline, then constant)"""
    actor_dropout: float = 0.0
    """dropout in the actor (preset: Adroit 0.1, as CORL)"""


# Presets per family (CORL's finetune/iql configs, the EDIS IQL gins) and per task; DATA: reward/state conventions.
PRESETS = {
    "antmaze": dict(expectile=0.9, beta=10.0, edis_ratio=0.2, edis_diffusion_steps=50_000, eval_episodes=100),
    "adroit": dict(expectile=0.8, beta=3.0, actor_dropout=0.1, edis_ratio=0.2, edis_diffusion_steps=30_000),
    "mujoco": dict(expectile=0.7, beta=3.0, edis_ratio=0.2, edis_diffusion_steps=30_000),
    "pointmaze": dict(expectile=0.9, beta=10.0, edis_ratio=0.5, edis_diffusion_steps=30_000),
}
TASK_PRESETS = {  # EDIS IQL gins: synthetic ratio, expectile and diffusion steps per task
    "antmaze-umaze-diverse": dict(edis_ratio=0.9, expectile=0.7),
    "antmaze-large-play": dict(edis_ratio=0.1, edis_diffusion_steps=30_000),
    "antmaze-large-diverse": dict(edis_ratio=0.1, edis_diffusion_steps=30_000),
    "hopper-medium": dict(edis_ratio=0.2),
    "halfcheetah-medium": dict(edis_ratio=0.5, edis_diffusion_steps=50_000),
}
DATA = {  # states standardised?, r -> scale r + bias, returns normalised to 1000 first (CORL)
    "antmaze": dict(normalize_states=True, reward_scale=1.0, reward_bias=-1.0, normalize_returns=False),
    "adroit": dict(normalize_states=True, reward_scale=1.0, reward_bias=0.0, normalize_returns=False),
    "mujoco": dict(normalize_states=True, reward_scale=1.0, reward_bias=0.0, normalize_returns=True),
    "pointmaze": dict(normalize_states=True, reward_scale=1.0, reward_bias=-1.0, normalize_returns=False),
}
ALGO_CPU_PRESETS: dict = {}  # IQL needs nothing smaller than the shared CPU preset
ALGO_RANGES = {"expectile": "(0, 1)", "beta": "[0, inf)", "critic_lr": "(0, inf)", "actor_lr": "(0, inf)",
               "actor_dropout": "[0, 1)"}
INFINITE_OK: tuple = ()  # float flags that may be +-inf
ALGO_FROZEN: set = set()  # IQL flags a --resume may not change, beyond FROZEN
# >>> shared:presets_device
# GPU: the paper's scale. CPU: `--env pointmaze-umaze` in about a quarter of an hour on 2 cores.
DEVICE_PRESETS = {
    "cuda": dict(offline_steps=1_000_000, online_steps=200_000, eval_every=10_000, edis_retrain_every=10_000,
                 edis_num_samples=100_000, edis_width=1024, edis_depth=6, edis_sample_steps=128, energy_pool=4096,
                 energy_steps=200),
    "cpu": dict(offline_steps=20_000, online_steps=20_000, eval_every=5_000, edis_retrain_every=5_000,
                edis_num_samples=20_000, edis_diffusion_steps=12_000, edis_width=256, edis_depth=3,
                edis_sample_steps=32, energy_pool=2048, energy_steps=100, eval_episodes=5),
}
# Flags a --resume may not change; --edis-extras may until the first EDIS retrain builds the energies.
FROZEN = {"env", "seed", "dataset_path", "hidden_dim", "gamma"}


def preset_values(args: Args) -> dict:
    """The defaults on --env and --device (merged by utils/run.py)."""
    task = get_task(args.env)
    return harness.preset_defaults(harness.resolve_device(args.device), DEVICE_PRESETS, PRESETS[task.family],
                                   TASK_PRESETS.get(task.name, {}), ALGO_CPU_PRESETS)
# <<< shared:presets_device


# >>> shared:buffers
# --- Replay buffers on the training device (sampling never leaves it) ---
FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


class ReplayBuffer:
    """A ring buffer of transitions on ``device``; ``extra``: more fields, with the value of rows that lack them."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device: torch.device, extra: Optional[dict] = None):
        self.capacity, self.device, self.size, self.ptr = int(capacity), device, 0, 0
        self.extra = dict(extra or {})
        shapes = {"observations": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_observations": (obs_dim,),
                  "terminals": (), **{k: () for k in self.extra}}
        self.data = {k: torch.zeros((self.capacity, *s), device=device) for k, s in shapes.items()}

    def add_batch(self, batch: dict) -> None:
        n = len(batch["rewards"])
        idx = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        for k, v in self.data.items():
            v[idx] = torch.as_tensor(batch[k], dtype=torch.float32, device=self.device) if k in batch else self.extra[k]
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def add(self, obs, action, reward, next_obs, terminal) -> None:
        self.add_batch({"observations": obs[None], "actions": action[None], "rewards": np.array([reward]),
                        "next_observations": next_obs[None], "terminals": np.array([terminal])})

    def sample(self, n: int, generator: torch.Generator) -> dict:
        idx = torch.randint(0, self.size, (n,), device=self.device, generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def rows(self) -> dict:
        return {k: v[: self.size] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"size": self.size, "ptr": self.ptr, "data": {k: v.cpu() for k, v in self.rows().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.ptr = state["size"], state["ptr"]
        for k, v in state["data"].items():
            self.data[k][: self.size] = v.to(self.device)


def sample_union(a: ReplayBuffer, b: ReplayBuffer, n: int, generator: torch.Generator) -> dict:
    """Uniform over the union of two buffers (offline + online replay, as CORL's single growing buffer)."""
    idx = torch.randint(0, a.size + b.size, (n,), device=a.device, generator=generator)
    from_a = idx < a.size
    ia, ib = idx.clamp(max=a.size - 1), (idx - a.size).clamp(min=0, max=max(b.size - 1, 0))
    return {k: torch.where(from_a.view(-1, *([1] * (a.data[k].dim() - 1))), a.data[k][ia], b.data[k][ib])
            for k in a.data}


def concat_batches(x: dict, y: dict) -> dict:
    return {k: torch.cat([x[k], y[k]]) for k in x}
# <<< shared:buffers


# --- ALGO LOGIC: IQL networks ---
# >>> shared:networks
def mlp(in_dim: int, out_dim: int, hidden: int, n_hidden: int = 2, dropout: float = 0.0) -> nn.Sequential:
    layers, d = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


def adam(params, lr: float, betas: tuple = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Adam, in one fused kernel where torch has it (same math)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # an older torch or an unsupported device
        return torch.optim.Adam(params, lr=lr, betas=betas)


class TwinQ(nn.Module):
    """The two critics of clipped double Q-learning (Fujimoto et al. 2018): two MLPs Q_i of [s; a]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int = 2):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, 1, hidden, n_hidden)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden, n_hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """[B, S], [B, A] -> [2, B]: Q_1(s, a) and Q_2(s, a)."""
        return self.forward_multi(obs, act[:, None])[..., 0]

    def forward_multi(self, obs: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """N actions per state: [B, S], [B, N, A] -> [2, B, N]."""
        x = torch.cat([obs.unsqueeze(1).expand(-1, acts.shape[1], -1), acts], -1)
        return torch.stack([self.q1(x)[..., 0], self.q2(x)[..., 0]])


def polyak(target: nn.Module, online: nn.Module, tau: float) -> None:
    """theta' <- (1 - tau) theta' + tau theta."""
    with torch.no_grad():
        for p_target, p in zip(target.parameters(), online.parameters()):
            p_target.mul_(1.0 - tau).add_(p, alpha=tau)
# <<< shared:networks


class ValueNet(nn.Module):
    def __init__(self, obs_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class GaussianActor(nn.Module):
    """Mean tanh(MLP(s)) * max_action, state-independent log-std (CORL's GaussianPolicy)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, max_action: float, dropout: float = 0.0):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden, dropout=dropout)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.max_action = max_action

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean = torch.tanh(self.net(obs)) * self.max_action
        return torch.distributions.Normal(mean, self.log_std.clamp(-20.0, 2.0).exp(), validate_args=False)

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """Exploration and the policy energy's positives: a ~ pi(.|s), clipped."""
        return self.dist(obs).sample().clamp(-self.max_action, self.max_action)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Evaluation: the mean action (CORL)."""
        return self.dist(obs).mean.clamp(-self.max_action, self.max_action)


class Agent(nn.Module):
    """Everything IQL learns (one state_dict for checkpoints)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, max_action: float, actor_dropout: float):
        super().__init__()
        self.qf = TwinQ(obs_dim, act_dim, hidden)
        self.q_target = TwinQ(obs_dim, act_dim, hidden)
        self.q_target.load_state_dict(self.qf.state_dict())
        self.q_target.requires_grad_(False)
        self.vf = ValueNet(obs_dim, hidden)
        self.actor = GaussianActor(obs_dim, act_dim, hidden, max_action, actor_dropout)


def make_optimizers(agent: Agent, critic_lr: float, actor_lr: float) -> dict:
    """An Adam each for V, the twin Q and the actor (CORL)."""
    return {"v": adam(agent.vf.parameters(), critic_lr), "q": adam(agent.qf.parameters(), critic_lr),
            "actor": adam(agent.actor.parameters(), actor_lr)}


def actor_lr_at(step: int, actor_lr: float, offline_steps: int) -> float:
    """Cosine decay offline (CORL's CosineAnnealingLR), then constant (docs: deviation 13)."""
    if step >= offline_steps:
        return actor_lr
    return actor_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(offline_steps, 1)))


# --- ALGO LOGIC: IQL update (Kostrikov et al. 2021, Eqs. 5-7) ---
def expectile_loss(u: torch.Tensor, expectile: float) -> torch.Tensor:
    """Eq. 5: L_2^tau(u) = |tau - 1(u < 0)| u^2, averaged; u = Q(s, a) - V(s)."""
    weight = torch.where(u < 0, 1.0 - expectile, expectile)
    return (weight * u.pow(2)).mean()


def awr_weights(adv: torch.Tensor, beta: float, max_weight: float = 100.0) -> torch.Tensor:
    """Eq. 7: exp(beta A(s, a)), clipped at 100 (IQL, CORL)."""
    return torch.exp(beta * adv).clamp(max=max_weight)


def iql_losses(agent: Agent, batch: dict, expectile: float, beta: float, gamma: float) -> tuple:
    """(V loss, Q loss, actor loss, metrics); V(s') and the advantages use V before its update (detached), as CORL."""
    s, a, r, s2, d = (batch[k] for k in FIELDS)  # [B, S], [B, A], [B], [B, S], [B]
    with torch.no_grad():
        q_target = agent.q_target(s, a).min(0).values  # min over the twin target critics
        next_v = agent.vf(s2)
    v = agent.vf(s)
    adv = q_target - v  # A(s, a) = Q_target(s, a) - V(s)
    v_loss = expectile_loss(adv, expectile)  # Eq. 5
    target = r + gamma * (1.0 - d) * next_v  # Eq. 6: true terminals stop bootstrapping, timeouts do not
    qs = agent.qf(s, a)  # [2, B]
    q_loss = (qs - target.unsqueeze(0)).pow(2).mean()  # both critics' MSEs
    weights = awr_weights(adv.detach(), beta)  # Eq. 7: advantage-weighted regression
    actor_loss = -(weights * agent.actor.dist(s).log_prob(a).sum(-1)).mean()
    metrics = {"losses/v_loss": v_loss.detach(), "losses/q_loss": q_loss.detach(),
               "losses/actor_loss": actor_loss.detach(), "losses/v_mean": v.detach().mean(),
               "losses/q_mean": qs.detach().mean(), "losses/adv_mean": adv.detach().mean(),
               "losses/awr_weight_mean": weights.mean()}
    return v_loss, q_loss, actor_loss, metrics


def iql_update(agent: Agent, opts: dict, batch: dict, expectile: float, beta: float, gamma: float,
               tau: float) -> dict:
    """One IQL step in CORL's order: V, Q, actor, each its own backward and Adam; then Polyak."""
    v_loss, q_loss, actor_loss, metrics = iql_losses(agent, batch, expectile, beta, gamma)
    for name, loss in (("v", v_loss), ("q", q_loss), ("actor", actor_loss)):
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
    polyak(agent.q_target, agent.qf, tau)
    return metrics


BUFFER_EXTRA: dict = {}  # per-row fields beyond (s, a, r, s', terminal): none for IQL


# >>> shared:edis
# --- ALGO LOGIC: EDIS (Liu et al. 2024): diffusion of transitions, samples steered by learned energies ---
# x = [s, a, r, s', terminal]. Prior p(x): offline + online replay. Target (EDIS Sec. 4): q(x) = d_pi(s) pi(a|s)
# T(s'|s,a) = p(x) exp(-E_s - E_pi - E_T), each E a log-ratio of q's and p's factor. The exact energy at noise level
# sigma is a function of the WHOLE noisy x (CEP, Lu et al. 2023, Thm. 3.1): networks of the full noisy x, trained by
# InfoNCE (CEP Sec. 4), guiding s, a, s' by their gradient; negatives from the prior's conditionals (CSDI masks).
class TransitionCodec:
    """Blocks of a transition vector and its standardisation (refitted at each retrain)."""

    def __init__(self, obs_dim: int, act_dim: int, device: torch.device):
        S, A = obs_dim, act_dim
        self.obs_dim, self.act_dim, self.dim = S, A, 2 * S + A + 2
        self.s, self.a, self.r = slice(0, S), slice(S, S + A), slice(S + A, S + A + 1)
        self.s2, self.d = slice(S + A + 1, 2 * S + A + 1), slice(2 * S + A + 1, 2 * S + A + 2)
        self.mean, self.std = torch.zeros(self.dim, device=device), torch.ones(self.dim, device=device)

    def mask(self, *blocks: slice) -> torch.Tensor:
        m = torch.zeros(self.dim, device=self.mean.device)
        for b in blocks:
            m[b] = 1.0
        return m

    def raw(self, batch: dict) -> torch.Tensor:
        return torch.cat([batch["observations"], batch["actions"], batch["rewards"][:, None],
                          batch["next_observations"], batch["terminals"][:, None]], -1)

    def fit(self, x_raw: torch.Tensor) -> None:
        self.mean, self.std = x_raw.mean(0), x_raw.std(0).clamp(min=1e-3)
        self.mean[self.d], self.std[self.d] = 0.0, 1.0  # the terminal stays 0/1 (SynthER): no 30-sigma outliers

    def encode(self, batch: dict) -> torch.Tensor:
        return (self.raw(batch) - self.mean) / self.std

    def decode(self, x: torch.Tensor) -> dict:
        y = x * self.std + self.mean
        return {"observations": y[:, self.s], "actions": y[:, self.a], "rewards": y[:, self.r.start],
                "next_observations": y[:, self.s2], "terminals": (y[:, self.d.start] > 0.5).float()}


# --- EDM (Karras et al. 2022): preconditioning, loss, noise schedule, stochastic Heun sampler ---
SIGMA_DATA, SIGMA_MIN, SIGMA_MAX, RHO = 1.0, 0.002, 80.0, 7.0
P_MEAN, P_STD, S_CHURN, S_TMIN, S_TMAX, S_NOISE = -1.2, 1.2, 80.0, 0.05, 50.0, 1.003
DIFFUSION_LR, DIFFUSION_BATCH, EMA_DECAY = 3e-4, 256, 0.999  # SynthER and the official code
ENERGY_LR, ENERGY_BATCH, ENERGY_HIDDEN, SAMPLE_CHUNK = 1e-3, 256, 256, 10_000


def edm_coefficients(sigma: torch.Tensor) -> tuple:
    """Table 1: c_skip, c_out, c_in, c_noise of D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)."""
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
    c_in = 1.0 / (sigma**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4.0


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise, then an MLP."""

    def __init__(self, out_dim: int, n_freq: int = 16):
        super().__init__()
        self.register_buffer("freq", torch.randn(n_freq) * 2.0 * math.pi)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq + 1, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        f = c[:, None] * self.freq[None]
        return self.mlp(torch.cat([c[:, None], f.sin(), f.cos()], -1))


class ResidualMLPDenoiser(nn.Module):
    """F(x, mask, c_noise): SynthER's residual MLP; ``mask``: the clean condition's dimensions."""

    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        self.inp = nn.Linear(2 * dim, width)
        self.temb = FourierEmbedding(width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x, mask], -1)) + self.temb(c_noise)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def edm_denoise(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Eq. 7, D(x; sigma), sigma [B] or [1] (one sigma for the batch: the sampler's fast form, its time embedding
    computed once, tests/test_edis_iql.py). Where ``mask`` is 1 the input is a clean condition, returned unchanged."""
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    mask = torch.zeros_like(x) if mask is None else mask.expand_as(x)
    given = mask.bool()
    d = c_skip[:, None] * x + c_out[:, None] * net(torch.where(given, x, c_in[:, None] * x), mask, c_noise)
    return torch.where(given, x, d)


def edm_loss(net: nn.Module, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 8 with ln(sigma) ~ N(P_mean, P_std^2); the condition's dimensions (``mask``) stay clean."""
    sigma = (P_MEAN + P_STD * torch.randn(x0.shape[0], device=x0.device, generator=generator)).exp()
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    x = x0 + sigma[:, None] * torch.randn(x0.shape, device=x0.device, generator=generator)
    if mask is not None:
        x = torch.where(mask.bool(), x0, x)
    return (weight[:, None] * (edm_denoise(net, x, sigma, mask) - x0).pow(2)).mean()


def karras_sigmas(n_steps: int, device: torch.device) -> torch.Tensor:
    """Eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N; sigma_N = 0."""
    i = torch.arange(n_steps, device=device, dtype=torch.float32)
    s = (SIGMA_MAX ** (1 / RHO) + i / max(n_steps - 1, 1) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return torch.cat([s, torch.zeros(1, device=device)])


def edm_sample(net: nn.Module, n: int, dim: int, n_steps: int, generator: torch.Generator,
               guidance: Optional[Callable] = None, known: Optional[torch.Tensor] = None,
               known_mask: Optional[torch.Tensor] = None, stats: Optional[dict] = None,
               guide_sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Stochastic Heun (Karras Alg. 2) on dx/dsigma = (x - D(x; sigma)) / sigma + sigma grad_x E(x, sigma), the ODE of
    p_sigma exp(-E_sigma) (EDIS Sec. 4), guided where sigma <= guide_sigma_max; ``known`` dimensions stay fixed."""
    device = next(net.parameters()).device
    sigmas = karras_sigmas(n_steps, device)
    mask = torch.zeros(dim, device=device) if known_mask is None else known_mask.to(device)
    x = torch.randn(n, dim, device=device, generator=generator) * sigmas[0]
    if known is not None:
        x = torch.where(mask.bool(), known, x)

    def direction(x_: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((n,), sigma, device=device)
        with torch.no_grad():
            d = (x_ - edm_denoise(net, x_, sig[:1], mask)) / sigma  # sig[:1]: the same D, embedded once
        if guidance is None or sigma > guide_sigma_max:
            return d
        g = sigma * guidance(x_, sig) * (1.0 - mask)
        if stats is not None:
            stats["guidance_norm"] += g.norm(dim=-1).mean()
            stats["n"] += 1
        return d + g

    for i in range(n_steps):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(S_CHURN / n_steps, math.sqrt(2.0) - 1.0) if S_TMIN <= s_cur <= S_TMAX else 0.0
        s_hat = s_cur * (1.0 + gamma)
        if gamma > 0:  # noise from sigma_i up to sigma_hat (not on the given dimensions)
            eps = torch.randn(x.shape, device=device, generator=generator) * S_NOISE * (1.0 - mask)
            x = x + math.sqrt(s_hat**2 - s_cur**2) * eps
        d = direction(x, s_hat)
        x_next = x + (s_next - s_hat) * d  # Euler step
        if s_next > 0:  # Heun correction (2nd order)
            x_next = x + (s_next - s_hat) * 0.5 * (d + direction(x_next, s_next))
        x = x_next
    return x


def ema_decay(step: int, max_decay: float = EMA_DECAY) -> float:
    """The official code's EMA warm-up (ema-pytorch): the random init is forgotten, not kept at 0.999^t."""
    return min(max_decay, 1.0 - (1.0 + step) ** (-2.0 / 3.0))


def data_rows(n_rows: int, n_online: int, n: int, online_frac: float, generator: torch.Generator) -> torch.Tensor:
    """n row indices; the last n_online rows are online, drawn with probability online_frac (0: uniform)."""
    dev = generator.device
    if 0 < n_online < n_rows and online_frac > 0:
        off = torch.randint(0, n_rows - n_online, (n,), device=dev, generator=generator)
        on = torch.randint(n_rows - n_online, n_rows, (n,), device=dev, generator=generator)
        return torch.where(torch.rand(n, device=dev, generator=generator) < online_frac, on, off)
    return torch.randint(0, n_rows, (n,), device=dev, generator=generator)


def train_diffusion(x: torch.Tensor, steps: int, width: int, depth: int, generator: torch.Generator,
                    cond_masks: torch.Tensor, n_online: int = 0, online_frac: float = 0.0,
                    lr: float = DIFFUSION_LR) -> tuple:
    """A fresh denoiser of x [N, D] (AdamW, cosine lr, grad clip 1) and its EMA; half the rows get a condition."""
    net = ResidualMLPDenoiser(x.shape[1], width, depth).to(x.device)
    ema = ResidualMLPDenoiser(x.shape[1], width, depth).to(x.device)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = adam(net.parameters(), lr, betas=(0.9, 0.99))  # the official AdamW, weight decay 0: Adam
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = torch.zeros(steps, device=x.device)
    B, dev = DIFFUSION_BATCH, x.device
    for step in range(steps):
        idx = data_rows(len(x), n_online, B, online_frac, generator)
        which = torch.randint(0, len(cond_masks), (B,), device=dev, generator=generator)
        uncond = torch.rand(B, device=dev, generator=generator) < 0.5
        mask = torch.where(uncond[:, None], 0.0, cond_masks[which])
        loss = edm_loss(net, x[idx], generator, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = ema_decay(step)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.mul_(decay).add_(p, alpha=1.0 - decay)
        losses[step] = loss.detach()
    return ema, losses


def sample_chunked(net: nn.Module, n: int, dim: int, n_steps: int, generator: torch.Generator,
                   known: Optional[torch.Tensor] = None, **kw) -> torch.Tensor:
    out = []
    for i in range(0, n, SAMPLE_CHUNK):  # (memory)
        k = known[i:i + SAMPLE_CHUNK] if known is not None else None
        out.append(edm_sample(net, min(SAMPLE_CHUNK, n - i), dim, n_steps, generator, known=k, **kw))
    return torch.cat(out)


class EnergyNet(nn.Module):
    """E(x, sigma): an MLP of c_in(sigma) x and c_noise (the denoiser's inputs); ``features``: the extras'."""

    def __init__(self, dim: int, features: Optional[nn.Module] = None):
        super().__init__()
        self.features = features
        self.net = mlp(dim + (0 if features is None else features.out_dim) + 1, 1, ENERGY_HIDDEN, n_hidden=3)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _, _, c_in, c_noise = edm_coefficients(sigma)
        h = c_in[:, None] * x
        if self.features is not None:
            h = torch.cat([h, self.features(h, c_in * sigma)], -1)
        return self.net(torch.cat([h, c_noise[:, None]], -1)).squeeze(-1)


def make_guidance(energies: nn.ModuleDict, weights: dict, dims: Optional[torch.Tensor] = None
                  ) -> Optional[Callable]:
    """grad_x sum_k w_k E_k(x, sigma), the full gradient over the whole noisy transition (CEP Thm. 3.1);
    ``dims``: 0 on the dimensions left unguided."""
    active = {k: weights.get(k, 1.0) for k in energies if weights.get(k, 1.0) != 0.0}
    if not active:
        return None

    def guidance(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            e = sum(w * energies[k](x, sigma).sum() for k, w in active.items())
            grad = torch.autograd.grad(e, x)[0]
        return grad if dims is None else grad * dims

    return guidance


def guided_dims(codec: TransitionCodec, extras: bool) -> Optional[torch.Tensor]:
    """Guidance moves s, a and s' (the paper's energies are of (s, a, s'); the official code's masks): r and the
    terminal follow the prior, unbiased (benchmarks/toy_goal.py). --edis-extras guides all, as it was measured."""
    return None if extras else 1.0 - codec.mask(codec.r, codec.d)


def infonce_loss(energy: nn.Module, pos: torch.Tensor, neg: torch.Tensor, sigma: torch.Tensor,
                 generator: torch.Generator) -> tuple:
    """(loss, accuracy) of groups of a positive [G, D] and K negatives [G, K, D] noised at sigma [G]; its minimiser
    is E = -log q_sigma/p_sigma + c(sigma) (CEP Sec. 4)."""
    G, K, D = neg.shape
    x = torch.cat([pos[:, None], neg], 1)  # the positive first
    x = x + sigma[:, None, None] * torch.randn(x.shape, device=x.device, generator=generator)
    e = energy(x.reshape(G * (K + 1), D), sigma.repeat_interleave(K + 1)).view(G, K + 1)
    loss = F.cross_entropy(-e, torch.zeros(G, dtype=torch.long, device=x.device))
    return loss, (e.argmin(1) == 0).float().mean()


def contrastive_sets(names: tuple, sample: Callable, codec: TransitionCodec, x_on: torch.Tensor, x_pi: torch.Tensor,
                     x_data: Optional[torch.Tensor], K: int) -> dict:
    """Positives [M, D] and negatives [M, K, D] of each energy, differing only in its factor (EDIS Sec. 4);
    ``sample(n, known, mask)``: the prior or a conditional; x_pi: x_on with a ~ pi(.|s):
      state       [s_on, (a, r, s', d) ~ p(.|s_on)]     vs  x ~ p(x)
      policy      [s, a_pi, (r, s', d) ~ p(.|s, a_pi)]  vs  [s, (a, r, s', d) ~ p(.|s)]
      transition  a real online (s, a, r, s', d)        vs  [s, a, (r, s', d) ~ p(.|s, a)]
      realism     x ~ the denoiser's data               vs  x ~ p(x)    (extras)"""
    M, D = x_on.shape
    rep = lambda t: t.repeat_interleave(K, 0)  # noqa: E731  (K copies of each row)
    s_given, sa_given = codec.mask(codec.s), codec.mask(codec.s, codec.a)
    uncond = sample(M * K).view(M, K, D)
    given_s = sample(M * K, rep(x_on), s_given).view(M, K, D)
    given_sa = sample(M * K, rep(x_on), sa_given).view(M, K, D)
    sets = {"state": (given_s[:, 0], uncond), "policy": (sample(M, x_pi, sa_given), given_s),
            "transition": (x_on, given_sa)}
    if "realism" in names:
        sets["realism"] = (x_data, uncond)
    return sets


SIGMA_BANDS = ((0.0, 0.1), (0.1, 1.0), (1.0, 5.0), (5.0, SIGMA_MAX + 1.0))  # of the held-out accuracy


def train_energies(energies: nn.ModuleDict, opt: torch.optim.Optimizer, sets: dict, sigmas: torch.Tensor, steps: int,
                   generator: torch.Generator) -> dict:
    """InfoNCE steps at the levels ``sigmas`` on 4/5 of the groups; accuracy per noise band on the rest."""
    M, dev = len(next(iter(sets.values()))[0]), sigmas.device
    n_train = max(M - M // 5, 1)
    G = min(ENERGY_BATCH, n_train)
    metrics = {f"edis/energy_{m}_{k}": torch.zeros((), device=dev) for k in sets for m in ("loss", "acc")}
    for _ in range(steps):
        groups = torch.randint(0, n_train, (G,), device=dev, generator=generator)
        sigma = sigmas[torch.randint(0, len(sigmas), (G,), device=dev, generator=generator)]
        total = 0.0
        for k, (pos, neg) in sets.items():
            loss, acc = infonce_loss(energies[k], pos[groups], neg[groups], sigma, generator)
            total = total + loss
            metrics[f"edis/energy_loss_{k}"] += loss.detach() / steps
            metrics[f"edis/energy_acc_{k}"] += acc / steps
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    held = torch.arange(n_train, M, device=dev)
    with torch.no_grad():
        for lo, hi in SIGMA_BANDS:
            band = sigmas[(sigmas >= lo) & (sigmas < hi)]
            if len(held) == 0 or len(band) == 0:
                continue
            sigma = band[torch.randint(0, len(band), (len(held),), device=dev, generator=generator)]
            for k, (pos, neg) in sets.items():
                metrics[f"edis/energy_acc_{k}_sigma{lo:g}-{min(hi, SIGMA_MAX):g}"] = infonce_loss(
                    energies[k], pos[held], neg[held], sigma, generator)[1]
    return metrics


@dataclasses.dataclass
class EDISState:
    """What EDIS keeps; the energies exist from the first retrain on and persist (the official code)."""

    codec: TransitionCodec
    energies: Optional[nn.ModuleDict] = None
    energy_opt: Optional[torch.optim.Optimizer] = None
    synthetic: Optional[ReplayBuffer] = None
    retrains: int = 0
    last_retrain_step: int = -1


def build_energies(state: EDISState, extras: bool, position_dims: tuple) -> None:
    """The paper's three energies; the extras add the realism energy and position features."""
    c = state.codec
    names = ("state", "policy", "transition") + (("realism",) if extras else ())
    feats = (lambda: EnergyFeatures(position_proj(c, position_dims))) if extras else (lambda: None)
    state.energies = nn.ModuleDict({k: EnergyNet(c.dim, feats()) for k in names}).to(c.mean.device)
    state.energy_opt = adam(state.energies.parameters(), ENERGY_LR)


def fit_energies(state: EDISState, denoiser: nn.Module, online: ReplayBuffer, policy_sample: Callable,
                 x_train: torch.Tensor, generator: torch.Generator, *, sample_steps: int, pool: int, negatives: int,
                 steps: int, online_frac: float, sigma_max: float) -> dict:
    """Contrastive sets of ``pool`` online transitions; InfoNCE at the sampler's levels <= sigma_max."""
    c = state.codec
    sample = lambda n, known=None, mask=None: sample_chunked(  # noqa: E731
        denoiser, n, c.dim, sample_steps, generator, known=known, known_mask=mask)
    pos = online.sample(pool, generator)
    with torch.no_grad():
        x_on = c.encode(pos)
        x_pi = c.encode(dict(pos, actions=policy_sample(pos["observations"])))
        x_data = x_train[data_rows(len(x_train), online.size, pool, online_frac, generator)]
        sets = contrastive_sets(tuple(state.energies), sample, c, x_on, x_pi, x_data, negatives)
    sigmas = karras_sigmas(sample_steps, c.mean.device)[:-1]
    sigmas = sigmas[sigmas <= max(sigma_max, float(sigmas.min()))]
    return train_energies(state.energies, state.energy_opt, sets, sigmas, steps, generator)


def edis_retrain(state: EDISState, offline: ReplayBuffer, online: ReplayBuffer, policy_sample: Callable,
                 generator: torch.Generator, *, extras: bool, position_dims: tuple, diffusion_steps: int, width: int,
                 depth: int, sample_steps: int, n_samples: int, pool: int, negatives: int, energy_steps: int,
                 weights: dict) -> dict:
    """One EDIS round (Alg. 1): fresh diffusion, energies trained further, n_samples guided transitions."""
    t0, c = time.time(), state.codec
    x_raw = torch.cat([c.raw(offline.rows()), c.raw(online.rows())])
    c.fit(x_raw)
    x_train = (x_raw - c.mean) / c.std
    online_frac, sigma_max = (EXTRAS["online_frac"], EXTRAS["guide_sigma_max"]) if extras else (0.0, SIGMA_MAX)
    cond = torch.stack([c.mask(c.s), c.mask(c.s, c.a)])
    denoiser, diff_losses = train_diffusion(x_train, diffusion_steps, width, depth, generator, cond, online.size,
                                            online_frac)
    if state.energies is None:
        build_energies(state, extras, position_dims)
    metrics = fit_energies(state, denoiser, online, policy_sample, x_train, generator, sample_steps=sample_steps,
                           pool=pool, negatives=negatives, steps=energy_steps, online_frac=online_frac,
                           sigma_max=sigma_max)
    stats = {"guidance_norm": 0.0, "n": 0}
    x = sample_chunked(denoiser, n_samples, c.dim, sample_steps, generator, stats=stats, guide_sigma_max=sigma_max,
                       guidance=make_guidance(state.energies, weights, guided_dims(c, extras)))
    syn = c.decode(x.detach())
    syn["actions"] = syn["actions"].clamp(-1.0, 1.0)
    state.synthetic = ReplayBuffer(c.obs_dim, c.act_dim, n_samples, c.mean.device, extra=BUFFER_EXTRA)
    state.synthetic.add_batch(syn)
    state.retrains += 1
    real = online.rows()
    return {**metrics, "edis/diffusion_loss": diff_losses[-max(len(diff_losses) // 10, 1):].mean(),
            "edis/guidance_norm": stats["guidance_norm"] / max(stats["n"], 1),
            "edis/syn_reward_mean": syn["rewards"].mean(), "edis/online_reward_mean": real["rewards"].mean(),
            "edis/syn_state_mean_dist": (syn["observations"].mean(0) - real["observations"].mean(0)).norm(),
            "edis/retrain_time_s": torch.tensor(time.time() - t0)}
# <<< shared:edis


# >>> shared:extras
# --- NOT IN THE PAPER: --edis-extras, what the PointMaze studies of docs/results.md showed to help (off) ---
# * a "realism" energy -log p_data(x)/p(x) (data vs samples: the prior's own errors; Kim et al. 2023);
# * sin/cos features of the maze position for every energy (EnergyFeatures): raw MLPs cannot resolve walls;
# * half of every diffusion batch online, so the prior covers where guidance goes; guidance only at sigma <= 5,
#   on every dimension (r and the terminal too: guided_dims);
# * edis_calql.py: the CQL term sees the batch's online rows plus offline rows (cql_rows_batch).
EXTRAS = {"online_frac": 0.5, "guide_sigma_max": 5.0}
OCTAVES, COARSE = 8, 4  # sin/cos(2^k pi u), k < 8; s and s' apart at 2^4 = 16x lower frequencies


def position_proj(codec: TransitionCodec, position_dims: tuple) -> torch.Tensor:
    """Rows u = P x of the features: the maze (x, y) midway between s and s' (same gradient for s and s': guidance
    moves a transition without bending its step), then x, x', y, y' 16x coarser. No maze: no rows."""
    rows = []
    for i in position_dims:
        mid = codec.mask()
        mid[codec.s.start + i] = mid[codec.s2.start + i] = 0.5
        rows.append(mid)
    for i in position_dims:
        for start in (codec.s.start, codec.s2.start):
            row = codec.mask()
            row[start + i] = 2.0**-COARSE
            rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, codec.dim, device=codec.mean.device)


class EnergyFeatures(nn.Module):
    """sin/cos(2^k pi u_j), u = P x (NeRF's encoding), at their expectation under the input noise (Mip-NeRF):
    E[sin(w(u + n))] = sin(w u) exp(-w^2 s_j^2 / 2), s_j = std |P_j|: washed-out frequencies fade."""

    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.register_buffer("freq", 2.0 ** torch.arange(OCTAVES) * math.pi, persistent=False)
        self.register_buffer("proj", proj, persistent=False)
        self.out_dim = 2 * OCTAVES * len(proj)

    def forward(self, x: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
        f = (x @ self.proj.T)[..., None] * self.freq  # [B, J, octaves]
        damp = torch.exp(-0.5 * (self.freq * self.proj.norm(dim=1)[:, None] * noise_std[:, None, None]) ** 2)
        return torch.cat([(f.sin() * damp).flatten(-2), (f.cos() * damp).flatten(-2)], -1)
# <<< shared:extras


# >>> shared:checkpoint
# --- What a checkpoint holds (utils/run.py writes, finds and checks the file) ---
def checkpoint_state(args: Args, step: int, agent: nn.Module, opts: dict, online: ReplayBuffer, edis: EDISState,
                     norm: dict, progress: dict, gen: torch.Generator) -> dict:
    """Everything a resumed run needs to continue exactly."""
    check_finite_params(agent, f"step {step}")
    e, syn = edis.energies, edis.synthetic
    return {"args": dataclasses.asdict(args), "step": step, "agent": agent.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in opts.items()}, "online_buffer": online.state_dict(),
            "edis": {"codec": {"mean": edis.codec.mean.cpu(), "std": edis.codec.std.cpu()}, "retrains": edis.retrains,
                     "last_retrain_step": edis.last_retrain_step, "energies": e.state_dict() if e else None,
                     "energy_opt": edis.energy_opt.state_dict() if e else None,
                     "synthetic": syn.state_dict() if syn else None},
            "normalization": {k: torch.as_tensor(v) for k, v in norm.items()}, "progress": progress,
            "rng": get_rng_state(), "batch_generator": gen.get_state()}


def frozen_flags(ckpt: dict) -> set:
    """Flags a --resume of ``ckpt`` may not change."""
    return FROZEN | ALGO_FROZEN | ({"edis_extras"} if ckpt["edis"]["energies"] is not None else set())


def restore(ckpt: dict, args: Args, agent: nn.Module, opts: dict, online: ReplayBuffer, edis: EDISState,
            gen: torch.Generator, position_dims: tuple) -> tuple:
    """checkpoint_state's inverse, in place; returns (progress, step)."""
    agent.load_state_dict(ckpt["agent"])
    for k, o in opts.items():
        harness.restore_optimizer(o, ckpt["optimizers"][k])
    if ckpt["online_buffer"]["size"] > online.capacity:
        raise UserError(f"--online-steps {args.online_steps} is smaller than the {ckpt['online_buffer']['size']} "
                        f"online steps the checkpoint holds")
    online.load_state_dict(ckpt["online_buffer"])
    e, c = ckpt["edis"], edis.codec
    c.mean, c.std = e["codec"]["mean"].to(c.mean.device), e["codec"]["std"].to(c.mean.device)
    edis.retrains, edis.last_retrain_step = e["retrains"], e["last_retrain_step"]
    if e["energies"] is not None:
        build_energies(edis, args.edis_extras, position_dims)
        edis.energies.load_state_dict(e["energies"])
        edis.energy_opt.load_state_dict(e["energy_opt"])
    if e["synthetic"] is not None:
        edis.synthetic = ReplayBuffer(c.obs_dim, c.act_dim, e["synthetic"]["size"], online.device, BUFFER_EXTRA)
        edis.synthetic.load_state_dict(e["synthetic"])
    set_rng_state(ckpt["rng"])
    gen.set_state(ckpt["batch_generator"])
    return ckpt["progress"], ckpt["step"]
# <<< shared:checkpoint


# >>> shared:main
# --- Main: offline phase, then online phase ---
def main(argv: Optional[list] = None) -> None:
    # presets of --env and --device, then the flags given (with --resume: the saved flags, then those given)
    args, ckpt = harness.parse_flags(Args, argv, preset_values, frozen_flags, ALGO_RANGES, INFINITE_OK)
    if harness.already_finished(ckpt, args):  # a finished run stays finished unless its budget is raised
        return
    task, device = get_task(args.env), harness.resolve_device(args.device)
    if args.edis and not args.eval_only and 0 < args.online_steps <= args.edis_retrain_every + 1:
        print(f"warning: --online-steps {args.online_steps} leaves no EDIS retrain (the first is after "
              f"--edis-retrain-every {args.edis_retrain_every}): this run is plain fine-tuning", file=sys.stderr)
    exp_name, run_name, out_dir = harness.start_run(__file__, task.name, args, device)

    # TRY NOT TO MODIFY: seeding
    seed_everything(args.seed, args.torch_deterministic)
    gen = torch.Generator(device=device)  # the stream of batch indices and diffusion noise
    gen.manual_seed(args.seed)

    # data -> device buffers (states normalised, rewards transformed)
    data = load_offline_data(task, dataset_path=args.dataset_path)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    norm = normalization(data, **DATA[task.family]) if ckpt is None else {
        k: v.numpy() if v.dim() else float(v) for k, v in ckpt["normalization"].items()}
    norm_obs = lambda o: ((o - norm["obs_mean"]) / norm["obs_std"]).astype(np.float32)  # noqa: E731
    norm_rew = lambda r: r * norm["reward_scale"] + norm["reward_bias"]  # noqa: E731
    rewards = norm_rew(data.rewards)
    rows = {"observations": norm_obs(data.observations), "actions": data.actions, "rewards": rewards,
            "next_observations": norm_obs(data.next_observations), "terminals": data.terminals}
    # >>> algo: IQL's rows are plain transitions
    # <<< algo
    offline = ReplayBuffer(obs_dim, act_dim, len(data), device, extra=BUFFER_EXTRA)
    offline.add_batch(rows)
    online = ReplayBuffer(obs_dim, act_dim, max(args.online_steps, 1), device, extra=BUFFER_EXTRA)

    env = make_env(task, seed=args.seed)
    # >>> algo: the agent, its optimizers and its update
    agent = Agent(obs_dim, act_dim, args.hidden_dim, float(env.action_space.high[0]), args.actor_dropout).to(device)
    opts = make_optimizers(agent, args.critic_lr, args.actor_lr)

    def update(batch: dict, step: int) -> dict:  # one IQL update (Eqs. 5-7), the actor's lr on its schedule (CORL)
        for g in opts["actor"].param_groups:
            g["lr"] = actor_lr_at(step, args.actor_lr, args.offline_steps)
        return iql_update(agent, opts, batch, args.expectile, args.beta, args.gamma, args.tau)
    # <<< algo
    edis = EDISState(TransitionCodec(obs_dim, act_dim, device))
    progress = {"offline_score": None, "evals": [], "episodes": 0, "train_successes": [], "updates": 0,
                "episode_scores": [], "wall_time_s": 0.0}  # episode_scores: (step, score) of each online episode
    start_step = 0
    if ckpt is not None:
        progress, start_step = restore(ckpt, args, agent, opts, online, edis, gen, task.position_dims)
    make_output_dir(out_dir)  # only now: a failed start leaves no folder behind

    def run_eval(step: int, kind: str = "step") -> dict:  # deterministic episodes of the actor's mean action
        video = os.path.join(out_dir, "videos", f"{kind}{step}") if args.capture_video else None
        agent.actor.eval()
        res = evaluate(task, lambda o: agent.actor.act(torch.as_tensor(norm_obs(o), device=device)[None])[0].cpu()
                       .numpy(), args.eval_episodes, args.seed + 10_000, video_dir=video)
        agent.actor.train()
        return res

    precision = harness.set_precision(device, args.bf16, args.tf32)  # TF32 on CUDA unless --no-tf32
    if args.eval_only:  # evaluate a checkpoint (e.g. --resume run --eval-only --capture-video)
        return harness.write_eval(out_dir, task.name, start_step, run_eval(start_step, "eval-only-step"))
    harness.write_json(os.path.join(out_dir, "config.json"),  # the effective config, also on resume
                       {"args": dataclasses.asdict(args), "task": dataclasses.asdict(task), "device": str(device),
                        "precision": precision})
    if ckpt is not None:
        print(f"resumed {out_dir} at step {start_step}")
    amp = lambda: harness.bf16_autocast(device, args.bf16)  # noqa: E731
    logger = Logger(out_dir, dataclasses.asdict(args), run_name, track=args.track, project=args.wandb_project_name,
                    entity=args.wandb_entity)

    def evaluation(step: int) -> None:
        logger.flush(step)  # a diverged run stops here: a non-finite policy is never scored
        check_finite_params(agent, f"step {step}")
        res = run_eval(step)
        progress["evals"].append({"step": step, **res})
        logger.scalars(res, step)
        bar.set_postfix(score=f"{res['eval/normalized_score']:.1f}")

    def checkpoint(step: int) -> None:
        logger.flush(step)  # a diverged run stops before overwriting its last good checkpoint
        progress["wall_time_s"] = time.time() - t_start  # summed over sessions
        harness.save_checkpoint(os.path.join(out_dir, harness.CHECKPOINT),
                                checkpoint_state(args, step, agent, opts, online, edis, norm, progress, gen))

    def after_update(metrics: dict, step: int) -> None:
        logger.accumulate(metrics, step)
        progress["updates"] += 1

    total = args.offline_steps + args.online_steps
    bar = tqdm(total=total, initial=start_step, desc=task.name, unit="step", dynamic_ncols=True, mininterval=2.0)
    t_start, t_sps, n_sps = time.time() - progress["wall_time_s"], time.time(), 0
    print(f"{task.name}: {len(data)} offline transitions ({data.source}); logging to {out_dir}")

    # ALGO LOGIC: offline phase: the base algorithm on the offline dataset
    for step in range(start_step, args.offline_steps):
        with amp():
            after_update(update(offline.sample(args.batch_size, gen), step), step + 1)
        n_sps += 1
        bar.update(1)
        if (step + 1) % args.log_every == 0:
            logger.flush(step + 1)
            logger.scalars({"charts/SPS": n_sps / max(time.time() - t_sps, 1e-9)}, step + 1)
            t_sps, n_sps = time.time(), 0
        if (step + 1) % args.eval_every == 0 and step + 1 < args.offline_steps:
            evaluation(step + 1)
        if (step + 1) % args.checkpoint_every == 0:
            checkpoint(step + 1)
    if start_step <= args.offline_steps and progress["offline_score"] is None:
        evaluation(args.offline_steps)
        progress["offline_score"] = progress["evals"][-1]["eval/normalized_score"]
        tqdm.write(f"offline phase done: normalized score {progress['offline_score']:.1f} "
                   f"(success {progress['evals'][-1]['eval/success_rate']:.2f})")
        checkpoint(args.offline_steps)

    # ALGO LOGIC: online phase: act, store, update (EDIS batches once synthetic data exist). Checkpoints wait for the
    # episode's end, so a resumed run starts the same episode as an uninterrupted one.
    obs, _ = env.reset(seed=harness.reset_seed(args.seed, progress["episodes"]))
    ep_ret, ep_success, ep_start, checkpoint_due = 0.0, False, online.size, False
    for step in range(max(start_step, args.offline_steps), total):
        t = step - args.offline_steps  # online env steps done so far
        with torch.no_grad():
            action = agent.actor.sample(torch.as_tensor(norm_obs(obs), device=device)[None])[0].cpu().numpy()
        next_obs, reward, terminated, truncated, info = env.step(action)
        # terminal = true termination only; a time-limit truncation keeps bootstrapping
        online.add(norm_obs(obs), action, norm_rew(reward), norm_obs(next_obs), float(terminated))
        ep_ret += float(reward)
        ep_success |= bool(info.get("success", False))
        obs = next_obs
        episode_over = terminated or truncated
        if episode_over:
            progress["episodes"] += 1
            progress["train_successes"].append(ep_success)
            score = float(normalized_score(task, ep_ret))
            progress["episode_scores"].append([step + 1, score])
            ep_stats = {"charts/episodic_return": ep_ret, "charts/episodic_length": online.size - ep_start,
                        "charts/episodic_normalized_score": score}
            if task.goal_reaching:  # CORL's regret: 1 - mean success over the online training episodes
                ep_stats["charts/regret"] = 1.0 - float(np.mean(progress["train_successes"]))
            logger.scalars(ep_stats, step + 1)
            obs, _ = env.reset(seed=harness.reset_seed(args.seed, progress["episodes"]))
            ep_ret, ep_success, ep_start = 0.0, False, online.size
        # EDIS (Alg. 1): retrain every --edis-retrain-every online steps (not on the last step)
        if args.edis and t + 1 < args.online_steps and online.size >= args.edis_retrain_every and (
                edis.last_retrain_step < 0 or t + 1 - edis.last_retrain_step >= args.edis_retrain_every):
            tqdm.write(f"EDIS retrain {edis.retrains + 1} at online step {t + 1} ...")
            with amp():
                metrics = edis_retrain(
                    edis, offline, online, agent.actor.sample, gen, extras=args.edis_extras,
                    position_dims=task.position_dims, diffusion_steps=args.edis_diffusion_steps,
                    width=args.edis_width, depth=args.edis_depth, sample_steps=args.edis_sample_steps,
                    n_samples=args.edis_num_samples, pool=args.energy_pool, negatives=args.energy_negatives,
                    energy_steps=args.energy_steps, weights={"state": args.guide_state, "policy": args.guide_policy,
                                                             "transition": args.guide_transition})
            edis.last_retrain_step = t + 1
            logger.scalars(check_finite({k: float(v) for k, v in metrics.items()}, f"step {step + 1}"), step + 1)
        for _ in range(args.utd):
            if args.edis and edis.synthetic is not None:  # EDIS batches: --edis-ratio synthetic, the rest online
                n_syn = int(round(args.batch_size * args.edis_ratio))
                batch = concat_batches(edis.synthetic.sample(n_syn, gen), online.sample(args.batch_size - n_syn, gen))
            else:  # no EDIS, or before its first retrain: the base algorithm's own fine-tuning batches
                # >>> algo: uniform over offline + online replay (CORL's IQL fine-tuning)
                batch = sample_union(offline, online, args.batch_size, gen)
                # <<< algo
            with amp():
                # >>> algo: the same IQL update, the actor's schedule continuing
                after_update(update(batch, step), step + 1)
                # <<< algo
            n_sps += 1
        bar.update(1)
        if (step + 1) % args.log_every == 0:
            logger.flush(step + 1)
            logger.scalars({"charts/SPS": n_sps / max(time.time() - t_sps, 1e-9), "charts/synthetic_fraction":
                            args.edis_ratio if args.edis and edis.synthetic is not None else 0.0}, step + 1)
            t_sps, n_sps = time.time(), 0
        if (step + 1) % args.eval_every == 0 and step + 1 < total:
            evaluation(step + 1)
        checkpoint_due |= (step + 1) % args.checkpoint_every == 0
        if checkpoint_due and episode_over:
            checkpoint(step + 1)
            checkpoint_due = False
    if not progress["evals"] or progress["evals"][-1]["step"] != total:
        evaluation(total)
    bar.close()
    checkpoint(total)
    final, successes = progress["evals"][-1], progress["train_successes"]
    harness.finish_run(out_dir, {
        "env": task.name, "seed": args.seed, "edis": args.edis, "edis_extras": args.edis_extras,
        "offline_normalized_score": progress["offline_score"],
        "final_normalized_score": final["eval/normalized_score"], "final_success_rate": final["eval/success_rate"],
        "regret": 1.0 - float(np.mean(successes)) if task.goal_reaching and successes else None,
        "updates": progress["updates"], "online_env_steps": online.size, "online_episodes": progress["episodes"],
        "edis_retrains": edis.retrains, "wall_time_s": time.time() - t_start, "output_dir": out_dir,
    }, progress, args.offline_steps, f"{task.name}: {exp_name}, seed {args.seed}")
    logger.close()
    env.close()
# <<< shared:main


if __name__ == "__main__":
    run_cli(main)
