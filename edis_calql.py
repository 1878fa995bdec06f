# edis_calql.py: Cal-QL offline pre-training, then online fine-tuning with EDIS. Docs: docs/edis_calql.md
#
# Cal-QL: Nakamoto et al. "Cal-QL: Calibrated Offline RL Pre-Training for Efficient Online Fine-Tuning."
#       NeurIPS 2023, arXiv 2303.05479 (official code: nakamotoo/Cal-QL). CQL: Kumar et al. 2020, arXiv 2006.04779.
# EDIS: Liu et al. "Energy-Guided Diffusion Sampling for Offline-to-Online Reinforcement Learning." ICML 2024,
#       arXiv 2407.12448 (official code: liuxhym/EDIS; we implement what the paper intends, see docs/edis_calql.md).
# EDM:  Karras et al. "Elucidating the Design Space of Diffusion-Based Generative Models." arXiv 2206.00364.
# References for the Cal-QL details: CORL algorithms/finetune/cal_ql.py (hyper-parameters, reward conventions).
#
# Layout (identical in edis_iql.py, so `diff edis_iql.py edis_calql.py` shows only the algorithm):
#   Args and presets -> replay buffers -> networks -> ALGO LOGIC: Cal-QL update -> ALGO LOGIC: EDIS (diffusion,
#   energies, guided sampler) -> evaluation -> checkpoints -> main loop (offline phase, then online phase).
# Blocks between `# >>> shared:NAME` and `# <<< shared:NAME` must be textually identical in both EDIS scripts
# (tests/test_edis_shared.py checks it).
# Copying this file into another project: it needs utils/__init__.py, utils/common.py, utils/tasks.py,
# utils/offline_data.py and utils/collect.py (PointMaze data collection) beside it (docs/reliability.md).
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils.common import (
    SEED_RANGE,
    Diverged,
    UserError,
    atomic_torch_save,
    atomic_write_bytes,
    check_finite,
    check_flags,
    check_output_dir,
    cli_with_presets,
    config_table,
    get_rng_state,
    make_output_dir,
    peek_args,
    resumed_args,
    run_cli,
    safe_torch_load,
    save_curves_png,
    seed_everything,
    set_rng_state,
)
from utils.offline_data import OfflineData, load_offline_data
from utils.tasks import TaskSpec, get_task, make_env, normalized_score


# >>> shared:args_common
@dataclasses.dataclass
class Args:
    # The defaults written here are pointmaze-umaze's on CPU. For another --env or --device the presets below
    # (DEVICE_PRESETS, PRESETS, TASK_PRESETS) replace them, flags given on the command line win over everything, and
    # `--env X --help` prints the values a run on X would use.
    # --- run -----------------------------------------------------------------------------------------------------
    # Tasks: antmaze-{umaze,umaze-diverse,medium-play,medium-diverse,large-play,large-diverse} (antmaze-large =
    # antmaze-large-diverse), {pen,door,hammer,relocate}-{human,cloned,expert}, {hopper,halfcheetah,walker2d}-
    # {simple,medium,expert}, pointmaze-{umaze,medium,large}[-dense]; a typo prints the valid names.
    env: str = "pointmaze-umaze"
    """D4RL-style task name (antmaze-large, pen-human, hopper-medium, pointmaze-umaze, ...); selects the presets"""
    seed: int = 1
    """seed of python, numpy, torch, the env resets and the batch sampling"""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N; selects the device preset (GPU or CPU scale)"""
    torch_deterministic: bool = True
    """set torch.backends.cudnn.deterministic"""
    output_dir: Optional[str] = None
    """the run folder (default runs/<env>__<script>__<seed>__<unix time>)"""
    resume: Optional[str] = None
    """a run folder (or its checkpoint.pt) to continue; flags given with it override the saved ones (budgets, lrs)"""
    overwrite: bool = False
    """start afresh in an --output-dir that holds an earlier run, deleting its files (otherwise refused)"""
    dataset_path: Optional[str] = None
    """a D4RL-layout hdf5 file or a Minari dataset folder to use instead of the task's Minari dataset"""
    track: bool = False
    """also log to Weights & Biases (imported only then)"""
    wandb_project_name: str = "reference-rl"
    """W&B project (with --track)"""
    wandb_entity: Optional[str] = None
    """W&B entity (with --track)"""
    compile: bool = False
    """torch.compile the update step (worth it on GPU for long runs)"""
    # bf16 autocast: weights, optimizer states and losses stay fp32. On CPUs with AVX512-BF16/AMX it is 2x faster but
    # rounds Q-values of a few hundred to ~1, so the CPU preset leaves it off (docs/edis_iql.md, Speed).
    bf16: bool = False
    """matrix products of the updates and EDIS in bfloat16 (preset: on for CUDA GPUs with bf16, off on CPU)"""
    # --- budget, evaluation, logging -----------------------------------------------------------------------------
    offline_steps: int = 20_000
    """gradient updates on the offline dataset (preset: 1,000,000 on GPU, 20,000 on CPU)"""
    online_steps: int = 20_000
    """environment steps of online fine-tuning (preset: 200,000 on GPU as EDIS, 20,000 on CPU)"""
    utd: int = 1
    """online updates per environment step (update-to-data ratio)"""
    eval_every: int = 5000
    """evaluate every this many steps (offline updates and online env steps alike), and after each phase"""
    eval_episodes: int = 5
    """episodes per evaluation (preset: AntMaze 100, others 10; CPU preset 5)"""
    checkpoint_every: int = 10_000
    """write checkpoint.pt (atomically) every this many steps, and at the end of each phase"""
    log_every: int = 1_000
    """log training losses to TensorBoard every this many updates"""
    capture_video: bool = False
    """record the first episode of every evaluation as an mp4 in <output-dir>/videos (rendered without a display)"""
    eval_only: bool = False
    """with --resume: evaluate the checkpoint's policy (--eval-episodes, --capture-video) into eval.json; no training"""
    # --- data ----------------------------------------------------------------------------------------------------
    batch_size: int = 256
    """transitions per gradient update"""
    normalize_states: bool = True
    """standardise states with the offline dataset's mean and std, stored in checkpoints (preset per task family)"""
    reward_scale: float = 1.0
    """rewards become reward_scale * r + reward_bias, offline and online (preset per task family)"""
    reward_bias: float = -1.0
    """see --reward-scale (preset per task family: IQL AntMaze r - 1, Cal-QL AntMaze 10 r - 5)"""
    reward_normalize_returns: bool = False
    """locomotion convention: multiply rewards by 1000 / (max - min episode return of the dataset) first"""
    # --- EDIS ----------------------------------------------------------------------------------------------------
    edis: bool = True
    """use EDIS in the online phase; --no-edis runs plain fine-tuning on offline + online replay (the ablation)"""
    edis_ratio: float = 0.5
    """fraction of synthetic transitions in every online batch (the rest are online transitions)"""
    edis_offline_frac: float = 0.0
    """fraction of offline transitions kept in every EDIS batch (0: the paper, synthetic data replace them)"""
    edis_retrain_every: int = 5000
    """retrain diffusion + energies and regenerate synthetic data every this many online env steps"""
    edis_min_online: Optional[int] = None
    """first retrain only once the online buffer holds this many transitions (default: --edis-retrain-every)"""
    edis_num_samples: int = 20_000
    """synthetic transitions generated at each retrain (the synthetic buffer is replaced)"""
    edis_diffusion_steps: int = 3000
    """gradient steps of each (fresh) diffusion model training"""
    edis_diffusion_batch: int = 256
    """batch size of diffusion training"""
    edis_diffusion_lr: float = 3e-4
    """AdamW learning rate of the denoiser (cosine-decayed over --edis-diffusion-steps)"""
    edis_width: int = 256
    """width of the residual-MLP denoiser (preset: 1024 on GPU as the paper, 256 on CPU)"""
    edis_depth: int = 3
    """residual blocks of the denoiser (preset: 6 on GPU as the paper, 3 on CPU)"""
    edis_octaves: int = 0
    """sin/cos(2^k pi x) input features of the denoiser, k < this (0: raw input, as SynthER/EDIS; docs detail 9)"""
    edis_ema: float = 0.999
    """EMA decay of the denoiser weights used for sampling"""
    edis_sample_steps: int = 32
    """Heun steps of the EDM sampler (preset: 128 on GPU as the paper, 32 on CPU)"""
    edis_sample_batch: int = 10_000
    """transitions generated per sampler call"""
    edis_churn: float = 80.0
    """EDM S_churn of the stochastic sampler (Karras et al. Alg. 2)"""
    edis_energies: Literal["factored", "joint"] = "factored"
    """factored: the paper's three energies (state, policy, transition); joint: one energy, online data vs the prior"""
    edis_online_frac: float = 0.5
    """fraction of every diffusion training batch drawn from online transitions (0: uniform over offline + online)"""
    edis_cond_prob: float = 0.5
    """fraction of denoiser rows trained with s or (s, a) as a clean condition (factored energies, sequential)"""
    edis_sampler: Literal["joint", "sequential"] = "joint"
    """joint: one guided pass (EDIS Sec. 4); sequential: (s, a) first, then (r, s', d) given them (docs detail 15)"""
    guide_state: float = 1.0
    """weight of the state energy E_s (online state distribution); 1 = the exact product p * exp(-E) of the paper"""
    guide_policy: float = 1.0
    """weight of the policy energy E_pi (current policy's actions)"""
    guide_transition: float = 1.0
    """weight of the transition energy E_T (true dynamics)"""
    guide_online: float = 1.0
    """weight of the joint design's energy (online transitions vs the prior)"""
    guide_realism: float = 1.0
    """weight of the realism energy -log p_data/p (discriminator guidance, not in EDIS); 0: the paper's 3 only"""
    guide_sigma_max: float = 5.0
    """guide only at noise levels sigma <= this (80 = everywhere); above it the energies are near chance"""
    energy_negatives: int = 10
    """K: negatives per positive in each InfoNCE group"""
    energy_pool: int = 2048
    """online positives per retrain, K negatives each (preset: GPU 4096, CPU 2048; 256 starved the energies)"""
    energy_steps: int = 100
    """gradient steps of each energy per retrain (energies persist across retrains)"""
    energy_batch: int = 256
    """InfoNCE groups per energy gradient step"""
    energy_lr: float = 1e-3
    """Adam learning rate of the energies"""
    energy_hidden: int = 256
    """width of the 3-hidden-layer energy MLPs"""
    energy_octaves: int = 8
    """sin/cos(2^k pi u) input features of the energies, k < this, damped by input noise (0: raw; docs detail 12)"""
    energy_octave_dims: Literal["midpoint+position", "midpoint", "position", "all"] = "midpoint+position"
    """features of maze (x, y) midway in s -> s' + of s, s' apart 16x coarser; midpoint; s, s' apart; all (detail 12)"""
    edis_reward_model: bool = False
    """relabel synthetic rewards with a reward model fitted on offline + online data instead of the generated reward"""
    # --- networks ------------------------------------------------------------------------------------------------
    hidden_dim: int = 256
    """width of the actor and critic MLPs"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
# <<< shared:args_common
    # --- Cal-QL / CQL --------------------------------------------------------------------------------------------
    cql_alpha: float = 5.0
    """weight of the CQL regulariser in the offline phase (preset: AntMaze 5, Adroit 1, locomotion 5)"""
    cql_alpha_online: float = 5.0
    """weight of the CQL regulariser in the online phase (preset: the offline value, as the CORL/EDIS configs)"""
    cql_lagrange: bool = True
    """tune the CQL weight with a Lagrange multiplier alpha' that keeps the action gap near --cql-target-action-gap"""
    cql_target_action_gap: float = 0.8
    """target of logsumexp Q(s, .) - Q(s, a_data) with --cql-lagrange"""
    cql_n_actions: int = 4
    """actions sampled per state for each of the three CQL sets (uniform, pi(s), pi(s')) (preset: 10, CPU 4)"""
    cql_temp: float = 1.0
    """temperature of the CQL logsumexp"""
    cql_importance_sample: bool = True
    """importance-weight the logsumexp by the sampling densities (CQL(H) with importance sampling, as CORL)"""
    cql_clip_diff_min: float = -200.0
    """lower clip of logsumexp Q - Q(s, a_data) (preset: AntMaze -200, else -inf)"""
    cql_clip_diff_max: float = float("inf")
    """upper clip of logsumexp Q - Q(s, a_data)"""
    cql_max_target_backup: bool = True
    """TD target uses the max over --cql-n-actions next actions of the min target Q (preset: on for AntMaze/Adroit)"""
    backup_entropy: bool = False
    """subtract alpha * log pi(a'|s') in the TD target (off in CORL and the official Cal-QL)"""
    calibration: bool = True
    """Cal-QL: lower-bound the policy-action Q-values in the regulariser by the Monte-Carlo return (offline phase)"""
    calibration_online: bool = False
    """keep calibration on online, with returns of finished online episodes (official Cal-QL); off = CORL and EDIS"""
    is_sparse_reward: bool = True
    """MC returns: an episode whose rewards are all the failure reward (raw 0) gets r / (1 - gamma) at every step"""
    mixing_ratio: float = 0.5
    """without EDIS (or before its first retrain): fraction of offline data in online batches, < 1 (CORL's 0.5)"""
    cql_rows: Literal["all", "real", "base"] = "base"
    """EDIS: CQL regulariser's rows: all (paper), real (no synthetic), base (real + offline at --mixing-ratio)"""
    q_layers: int = 2
    """hidden layers of each critic (preset: AntMaze 5 as CORL, Adroit 3, locomotion 2, PointMaze 3)"""
    policy_layers: int = 3
    """hidden layers of the tanh-Gaussian actor (CORL: 3 x 256)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics and of alpha' (Lagrange)"""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor and of the entropy temperature alpha (CORL configs: 1e-4)"""
    orthogonal_init: bool = True
    """orthogonal initialisation (gain sqrt(2) hidden, 1e-2 output), as CORL's Cal-QL"""
    fused_update: bool = False
    """fast forms: one Adam step for the four losses' groups, both critics in one batched matmul (tested equal)"""


# Per-family presets (CORL's configs/finetune/cal_ql/*.yaml, the official Cal-QL scripts (nakamotoo/Cal-QL) and the
# official EDIS code's Cal-QL gin files): the defaults of every flag the command line does not give. Per-task
# entries refine them.
INF = float("inf")
PRESETS = {
    "antmaze": dict(normalize_states=False, reward_scale=10.0, reward_bias=-5.0, reward_normalize_returns=False,
                    is_sparse_reward=True, cql_alpha=5.0, cql_alpha_online=5.0, cql_lagrange=True, q_layers=5,
                    cql_max_target_backup=True, cql_clip_diff_min=-200.0, edis_ratio=0.5,
                    edis_diffusion_steps=10_000, cql_n_actions=10, eval_episodes=100),
    "adroit": dict(normalize_states=False, reward_scale=1.0, reward_bias=0.0, reward_normalize_returns=False,
                   is_sparse_reward=False, cql_alpha=1.0, cql_alpha_online=1.0, cql_lagrange=False, q_layers=3,
                   cql_max_target_backup=True, cql_clip_diff_min=-INF, edis_ratio=0.3,
                   edis_diffusion_steps=10_000, cql_n_actions=10, eval_episodes=10),
    "mujoco": dict(normalize_states=True, reward_scale=1.0, reward_bias=0.0, reward_normalize_returns=True,
                   is_sparse_reward=False, cql_alpha=5.0, cql_alpha_online=5.0, cql_lagrange=False, q_layers=2,
                   cql_max_target_backup=False, cql_clip_diff_min=-INF, edis_ratio=0.2,
                   edis_diffusion_steps=10_000, cql_n_actions=10, eval_episodes=10),
    "pointmaze": dict(normalize_states=True, reward_scale=10.0, reward_bias=-5.0, reward_normalize_returns=False,
                      is_sparse_reward=True, cql_alpha=5.0, cql_alpha_online=5.0, cql_lagrange=True, q_layers=3,
                      cql_max_target_backup=True, cql_clip_diff_min=-200.0, edis_ratio=0.5,
                      edis_diffusion_steps=10_000, cql_n_actions=10, eval_episodes=10),
}
TASK_PRESETS = {  # EDIS Cal-QL gins: synthetic ratio per task
    "antmaze-medium-play": dict(edis_ratio=0.3),
    "antmaze-medium-diverse": dict(edis_ratio=0.3),
    "door-human": dict(edis_ratio=0.5),
    "relocate-human": dict(edis_ratio=0.2, cql_alpha_online=2.5),
}
# On CPU, Cal-QL's critic passes over 1 + 3N actions per state dominate: smaller budgets, 4 CQL actions per set and
# 2 x 256 critics keep `--env pointmaze-umaze` within ~15 minutes on 2 cores (GPU runs keep the presets above).
ALGO_CPU_PRESETS = dict(offline_steps=6_000, online_steps=6_000, eval_every=3_000, edis_retrain_every=2_000,
                        q_layers=2, cql_n_actions=4)
ALGO_RANGES = {"critic_lr": "(0, inf)", "actor_lr": "(0, inf)", "cql_alpha": "[0, inf)", "cql_alpha_online": "[0, inf)",
               "cql_n_actions": "[1, inf)", "cql_temp": "(0, inf)", "mixing_ratio": "[0, 1)", "q_layers": "[1, inf)",
               "policy_layers": "[1, inf)"}  # allowed values (checked before anything loads)
INFINITE_OK = ("cql_clip_diff_min", "cql_clip_diff_max")  # float flags that may be +-inf (no clipping)
ALGO_RESUME_MAY_CHANGE = {"calibration_online", "cql_alpha_online", "mixing_ratio",
                         "cql_rows"}  # online-phase choices
# >>> shared:presets_device
# Budgets and model sizes by device. GPU: the paper's scale (1024x6 denoiser, 128 Heun steps, 100k samples per retrain
# every 10k steps). CPU: small enough that `--env pointmaze-umaze` finishes in minutes on 2 cores.
DEVICE_PRESETS = {
    "cuda": dict(offline_steps=1_000_000, online_steps=200_000, eval_every=10_000, edis_retrain_every=10_000,
                 edis_num_samples=100_000, edis_width=1024, edis_depth=6, edis_sample_steps=128, energy_pool=4096,
                 energy_steps=200),
    "cpu": dict(offline_steps=20_000, online_steps=20_000, eval_every=5_000, edis_retrain_every=5_000,
                edis_num_samples=20_000, edis_diffusion_steps=12_000, edis_width=256, edis_depth=3,
                edis_sample_steps=32, energy_pool=2048, energy_steps=100, eval_episodes=5),
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (try auto, cpu, cuda, cuda:0)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU (use --device cpu)")
    return dev


def preset_values(args: Args) -> dict:
    """Defaults for --env on --device: the device preset, then the task family's, then the task's (later ones win;
    on CPU the device's small budgets win over the family's GPU-scale sizes, and the algorithm's CPU sizes over
    both). Flags given on the command line win over all of them (main() parses them over these values)."""
    task, device = get_task(args.env), resolve_device(args.device)
    merged = {**DEVICE_PRESETS["cuda" if device.type == "cuda" else "cpu"]}
    for k, v in {**PRESETS[task.family], **TASK_PRESETS.get(task.name, {})}.items():
        if not (device.type != "cuda" and k in merged):
            merged[k] = v
    if device.type != "cuda":
        merged.update(ALGO_CPU_PRESETS)
    merged["bf16"] = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return {k: v for k, v in merged.items() if hasattr(args, k)}


def finish_args(args: Args) -> Args:
    """The one derived default, then every flag's range (checked before anything loads)."""
    if args.edis_min_online is None:
        args.edis_min_online = args.edis_retrain_every
    check_flags(args, {**COMMON_RANGES, **ALGO_RANGES}, INFINITE_OK)
    if args.edis_ratio + args.edis_offline_frac >= 1.0:
        raise UserError(f"--edis-ratio {args.edis_ratio} + --edis-offline-frac {args.edis_offline_frac} must be < 1 "
                        "(the rest of every batch is online transitions)")
    return args


def make_args(**flags) -> Args:
    """Args as the command line would give them (presets of flags["env"] on flags["device"], then the flags): for
    using this file from Python (tests, benchmarks)."""
    given = Args(**flags)
    return finish_args(dataclasses.replace(given, **{**preset_values(given), **flags}))


COMMON_RANGES = {  # allowed values of the shared flags, as intervals
    "seed": SEED_RANGE, "gamma": "[0, 1]", "tau": "[0, 1]", "edis_ratio": "[0, 1)", "edis_offline_frac": "[0, 1)",
    "edis_ema": "[0, 1)",
    "edis_diffusion_lr": "(0, inf)", "energy_lr": "(0, inf)", "edis_cond_prob": "[0, 1)", "edis_online_frac": "[0, 1]",
    "guide_sigma_max": "(0, inf)", "edis_churn": "[0, inf)", "edis_min_online": "[0, inf)",
    "offline_steps": "[0, inf)", "online_steps": "[0, inf)",
    **{name: "[1, inf)" for name in (
        "eval_every", "eval_episodes", "checkpoint_every", "log_every", "batch_size", "utd", "hidden_dim",
        "edis_retrain_every", "edis_num_samples", "edis_diffusion_steps", "edis_diffusion_batch", "edis_width",
        "edis_depth", "edis_sample_steps", "edis_sample_batch", "energy_negatives", "energy_pool", "energy_steps",
        "energy_batch", "energy_hidden")}, "edis_octaves": "[0, 16]", "energy_octaves": "[0, 16]",
}
# <<< shared:presets_device


# >>> shared:buffers
# ---------------------------------------------------------------------------------------------------------------
# BOILERPLATE: replay buffers on the training device (sampling never leaves the device)
# ---------------------------------------------------------------------------------------------------------------
FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


class ReplayBuffer:
    """A ring buffer of transitions stored as tensors on ``device``; ``sample`` draws uniform indices there.

    ``extra`` adds scalar fields with a fill value for rows that do not provide them (Cal-QL's ``mc_returns``).
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device: torch.device, extra: Optional[dict] = None):
        self.capacity, self.device, self.size, self.ptr = int(capacity), device, 0, 0
        self.extra = dict(extra or {})
        shapes = {"observations": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_observations": (obs_dim,),
                  "terminals": (), **{k: () for k in self.extra}}
        self.data = {k: torch.zeros((self.capacity, *s), dtype=torch.float32, device=device) for k, s in shapes.items()}

    def add_batch(self, batch: dict) -> torch.Tensor:
        """Append rows (a ring: the oldest are overwritten when full); returns their indices."""
        n = len(batch["rewards"])
        idx = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        for k, v in self.data.items():
            v[idx] = torch.as_tensor(batch[k], dtype=torch.float32, device=self.device) if k in batch else self.extra[k]
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        return idx

    def add(self, obs, action, reward, next_obs, terminal) -> None:
        self.add_batch({"observations": obs[None], "actions": action[None], "rewards": np.array([reward]),
                        "next_observations": next_obs[None], "terminals": np.array([terminal])})

    def sample_idx(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.size, (n,), device=self.device, generator=generator)

    def get(self, idx: torch.Tensor) -> dict:
        return {k: v[idx] for k, v in self.data.items()}

    def sample(self, n: int, generator: torch.Generator) -> dict:
        return self.get(self.sample_idx(n, generator))

    def rows(self) -> dict:
        """All stored rows (views, no copy)."""
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
    assert a.data.keys() == b.data.keys(), "buffers with different fields"
    out = {}
    for k in a.data:
        va, vb = a.data[k][ia], b.data[k][ib]
        out[k] = torch.where(from_a.view(-1, *([1] * (va.dim() - 1))), va, vb)
    return out


def concat_batches(x: dict, y: dict) -> dict:
    assert x.keys() == y.keys(), f"batches with different fields: {sorted(x)} vs {sorted(y)}"
    return {k: torch.cat([x[k], y[k]]) for k in x}


def reward_transform(data: OfflineData, args: Args) -> tuple:
    """(scale, bias) so that stored rewards are scale * r + bias (CORL's modify_reward conventions)."""
    scale = args.reward_scale
    if args.reward_normalize_returns:  # locomotion: 1000 / (max - min episode return), as CORL and IQL
        returns = data.episode_returns()
        spread = float(returns.max() - returns.min())
        scale *= 1000.0 / spread if spread > 0 else 1.0
    return float(scale), float(args.reward_bias)
# <<< shared:buffers


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: Cal-QL networks
# ---------------------------------------------------------------------------------------------------------------
# >>> shared:networks
def mlp(in_dim: int, out_dim: int, hidden: int, n_hidden: int = 2, dropout: float = 0.0) -> nn.Sequential:
    layers, d = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


def adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where torch supports it (CPU and CUDA): 4x faster steps for many small tensors."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # an older torch or an unsupported device: the default implementation
        return torch.optim.Adam(params, lr=lr)


class TwinQ(nn.Module):
    """The two critics of clipped double Q-learning (Fujimoto et al. 2018): two independent MLPs Q_i of [s; a]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n_hidden: int = 2, batched: bool = False):
        super().__init__()
        self.obs_dim, self.batched = obs_dim, batched
        self.q1 = mlp(obs_dim + act_dim, 1, hidden, n_hidden)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden, n_hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """obs [B, S], act [B, A] -> [2, B]: Q_1(s, a) and Q_2(s, a)."""
        return self.forward_multi(obs, act[:, None])[..., 0]

    def forward_multi(self, obs: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """Q_i(s_b, a_bn) for N actions per state: obs [B, S], acts [B, N, A] -> [2, B, N]."""
        if self.batched:
            return self.forward_batched(obs, acts)
        x = torch.cat([obs.unsqueeze(1).expand(-1, acts.shape[1], -1), acts], -1)  # [B, N, S + A]
        return torch.stack([self.q1(x)[..., 0], self.q2(x)[..., 0]])

    def forward_batched(self, obs: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """``forward_multi`` with both critics in one batched matmul per layer (--fused-update; tested equal), and the
        first layer's state half W_s s computed once per state for its N actions (W [s; a] = W_s s + W_a a)."""
        (B, N, A), S = acts.shape, self.obs_dim
        pairs = [(l1, l2) for l1, l2 in zip(self.q1, self.q2) if isinstance(l1, nn.Linear)]
        w = [torch.stack([l1.weight.T, l2.weight.T]) for l1, l2 in pairs]  # [2, in, out] per layer
        b = [torch.stack([l1.bias, l2.bias]).unsqueeze(1) for l1, l2 in pairs]  # [2, 1, out]
        hs = torch.baddbmm(b[0], obs.unsqueeze(0).expand(2, B, S), w[0][:, :S])  # [2, B, H]
        ha = torch.bmm(acts.reshape(1, B * N, A).expand(2, B * N, A), w[0][:, S:])  # [2, B*N, H]
        h = (ha.view(2, B, N, -1) + hs.unsqueeze(2)).view(2, B * N, -1)
        for wi, bi in zip(w[1:], b[1:]):
            h = torch.baddbmm(bi, torch.relu(h), wi)
        return h.view(2, B, N)


# <<< shared:networks


def orthogonal_init_(module: nn.Module, last_gain: float = 1e-2) -> None:
    """CORL's init_module_weights(orthogonal_init=True) of one MLP: hidden layers orthogonal with gain sqrt(2), the
    output layer with gain 1e-2, zero biases."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for i, layer in enumerate(linears):
        with torch.no_grad():
            nn.init.orthogonal_(layer.weight, gain=last_gain if i == len(linears) - 1 else math.sqrt(2.0))
            layer.bias.zero_()


class TanhGaussianActor(nn.Module):
    """SAC/CQL policy: a = max_action * tanh(u), u ~ N(mu(s), sigma(s)); log sigma = m * raw + o, with learnable
    scalars m = 1, o = -1 at init and a clamp to [-20, 2] (CORL's TanhGaussianPolicy)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, max_action: float, n_hidden: int = 3):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden, n_hidden)
        self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
        self.log_std_offset = nn.Parameter(torch.tensor(-1.0))
        self.max_action = max_action

    def _mu_logstd(self, obs: torch.Tensor) -> tuple:
        mu, raw = self.net(obs).chunk(2, -1)
        return mu, (self.log_std_multiplier * raw + self.log_std_offset).clamp(-20.0, 2.0)

    def rsample(self, obs: torch.Tensor, n: Optional[int] = None) -> tuple:
        """Reparameterised actions and log-probs: obs [B, S] -> ([B, A], [B]) or, with n, ([B, n, A], [B, n])."""
        mu, log_std = self._mu_logstd(obs)
        if n is not None:
            mu, log_std = mu.unsqueeze(1).expand(-1, n, -1), log_std.unsqueeze(1).expand(-1, n, -1)
        eps = torch.randn_like(mu)
        u = mu + log_std.exp() * eps
        # log N(u; mu, sigma) - sum log(1 - tanh(u)^2), with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
        logp = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return self.max_action * torch.tanh(u), logp

    @torch.no_grad()
    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """Exploration / EDIS policy-energy positives: a ~ pi(.|s)."""
        return self.rsample(obs)[0]

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Evaluation action: max_action * tanh(mu(s)) (CORL's deterministic act)."""
        return self.max_action * torch.tanh(self._mu_logstd(obs)[0])


class Agent(nn.Module):
    """Everything Cal-QL learns, in one module (one state_dict for checkpoints)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, max_action: float):
        super().__init__()
        self.qf = TwinQ(obs_dim, act_dim, args.hidden_dim, args.q_layers, batched=args.fused_update)
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim, max_action, args.policy_layers)
        if args.orthogonal_init:
            orthogonal_init_(self.qf.q1)
            orthogonal_init_(self.qf.q2)
            orthogonal_init_(self.actor.net)
        self.q_target = TwinQ(obs_dim, act_dim, args.hidden_dim, args.q_layers, batched=args.fused_update)
        self.q_target.load_state_dict(self.qf.state_dict())
        self.q_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))  # SAC entropy temperature, alpha = exp(log_alpha)
        self.log_alpha_prime = nn.Parameter(torch.ones(()))  # CQL Lagrange multiplier (CORL init 1.0)
        self.target_entropy = -float(act_dim)


def make_optimizers(agent: Agent, args: Args) -> dict:
    """CORL's four Adams: actor and temperature alpha (lr 1e-4), critics and the Lagrange alpha' (3e-4). With
    --fused-update, one Adam over the same four parameter groups (each loss reaches only its own group)."""
    groups = {"actor": (list(agent.actor.parameters()), args.actor_lr), "alpha": ([agent.log_alpha], args.actor_lr),
              "q": (list(agent.qf.parameters()), args.critic_lr),
              "alpha_prime": ([agent.log_alpha_prime], args.critic_lr)}
    if args.fused_update:
        return {"calql": adam([{"params": p, "lr": lr, "name": k} for k, (p, lr) in groups.items()], args.critic_lr)}
    return {k: adam(p, lr) for k, (p, lr) in groups.items()}


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: Monte-Carlo returns-to-go for the calibration (Cal-QL Sec. 4, Eq. 4)
# ---------------------------------------------------------------------------------------------------------------
def mc_returns(rewards: np.ndarray, episode_ends: np.ndarray, gamma: float,
               sparse_failure_reward: Optional[float] = None) -> np.ndarray:
    """G_t = sum_{k=t}^{T-1} gamma^(k-t) r_k within each episode (T its last step; nothing is bootstrapped past the
    end, whether it ended by a terminal or a timeout, as CORL and the official code).

    Sparse-reward convention (official Cal-QL, CORL PR #63): an episode whose rewards all equal
    ``sparse_failure_reward`` never reached the goal; each of its steps gets r / (1 - gamma), the return of failing
    forever, instead of a return truncated at the time limit (which would overestimate it: r < 0).
    """
    r = np.asarray(rewards, dtype=np.float64)
    ends = np.flatnonzero(episode_ends)
    out = np.empty_like(r)
    for start, stop in zip(np.concatenate([[0], ends[:-1] + 1]), ends + 1):
        ep = r[start:stop]
        if sparse_failure_reward is not None and np.all(ep == sparse_failure_reward):
            out[start:stop] = ep / (1.0 - gamma)
        elif len(ep) <= 2000:  # G_t = gamma^-t sum_{k>=t} gamma^k r_k: exact in float64 for these lengths
            disc = gamma ** np.arange(len(ep))
            out[start:stop] = np.cumsum((disc * ep)[::-1])[::-1] / disc
        else:  # very long episodes: the plain backward recursion G_t = r_t + gamma G_{t+1}
            g = 0.0
            for t in range(len(ep) - 1, -1, -1):
                g = ep[t] + gamma * g
                out[start + t] = g
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: Cal-QL update (CQL with importance-sampled logsumexp, Lagrange alpha', Cal-QL calibration)
# ---------------------------------------------------------------------------------------------------------------
def cql_logsumexp(q_rand, q_curr, q_next, logp_curr, logp_next, act_dim: int, temp: float, importance: bool):
    """log sum_a exp Q(s, a) estimated from the three action sets, [2, B, N] each -> [2, B] (CQL(H), CORL):
    with importance sampling each Q is divided by its sampling density: uniform 0.5^A, pi(a|s), pi(a'|s')."""
    if importance:
        random_density = act_dim * math.log(0.5)
        cat = torch.cat([q_rand - random_density, q_next - logp_next.detach().unsqueeze(0),
                         q_curr - logp_curr.detach().unsqueeze(0)], -1)
    else:
        cat = torch.cat([q_rand, q_next, q_curr], -1)
    return torch.logsumexp(cat / temp, -1) * temp


def calql_update(agent: Agent, opts: dict, batch: dict, args: Args, calibrate: bool, cql_alpha: float,
                 cql_batch: Optional[dict] = None) -> dict:
    """One Cal-QL step: SAC actor and temperature, TD + CQL critics, Lagrange alpha'; Polyak target.

    The actor and TD losses use ``batch``; the CQL regulariser (and alpha') uses ``cql_batch``, the same batch by
    default (the papers). With EDIS, --cql-rows may give it other rows (main builds them).
    """
    s, a, r, s2, d = (batch[k] for k in FIELDS)
    c = batch if cql_batch is None else cql_batch  # the rows of the CQL regulariser
    cs, ca, cs2, mc = c["observations"], c["actions"], c["next_observations"], c["mc_returns"]
    B, A = a.shape
    Bc = len(ca)
    N = args.cql_n_actions
    alpha = agent.log_alpha.exp().detach()

    # Actor and temperature (SAC): min_a' E[alpha log pi(a|s) - min_i Q_i(s, a)], a ~ pi reparameterised
    pi_a, logp = agent.actor.rsample(s)
    alpha_loss = -(agent.log_alpha * (logp.detach() + agent.target_entropy)).mean()
    q_pi = agent.qf(s, pi_a).min(0).values
    actor_loss = (alpha * logp - q_pi).mean()

    # TD target: r + gamma (1 - terminal) [min_i Q'_i(s', a') (- alpha log pi(a'|s'))], a' ~ pi(s'); with
    # max-target-backup, the max over N sampled a' (CQL's max backup, used by CORL and the official code)
    with torch.no_grad():
        n_next = N if args.cql_max_target_backup else 1
        a2, logp2 = agent.actor.rsample(s2, n_next)  # [B, n, A], [B, n]
        tq = agent.q_target.forward_multi(s2, a2).min(0).values  # [B, n]
        tq, idx = tq.max(1)
        logp2 = logp2.gather(1, idx[:, None]).squeeze(1)
        if args.backup_entropy:
            tq = tq - alpha * logp2
        td = r + args.gamma * (1.0 - d) * tq
        # CQL action sets: N uniform actions, N from pi(.|s) and N from pi(.|s'), all evaluated at s (detached)
        a_rand = torch.rand(Bc, N, A, device=a.device) * 2.0 - 1.0
        a_curr, logp_curr = agent.actor.rsample(cs, N)
        a_next, logp_next = agent.actor.rsample(cs2, N)
    # One forward for both critics and all 1 + 3N actions per state (the state half of layer 1 once per state)
    q_all = agent.qf.forward_multi(cs, torch.cat([ca[:, None], a_rand, a_curr, a_next], 1))  # [2, Bc, 1 + 3N]
    q_cdata, q_rand = q_all[..., 0], q_all[..., 1:1 + N]
    q_curr, q_next = q_all[..., 1 + N:1 + 2 * N], q_all[..., 1 + 2 * N:]
    q_data = q_cdata if cql_batch is None else agent.qf(s, a)  # [2, B]: the TD rows' Q(s, a)
    td_loss = (q_data - td.unsqueeze(0)).pow(2).mean(1).sum()  # MSE of each critic, summed (CORL)
    if calibrate:  # Cal-QL Eq. 4: policy-action Q-values are lower-bounded by the Monte-Carlo return mu's value
        bound = mc.view(1, Bc, 1)
        bound_rate = (q_curr < bound).float().mean()
        q_curr, q_next = torch.maximum(q_curr, bound), torch.maximum(q_next, bound)
    else:
        bound_rate = torch.zeros((), device=a.device)
    ood = cql_logsumexp(q_rand, q_curr, q_next, logp_curr, logp_next, A, args.cql_temp, args.cql_importance_sample)
    gap = (ood - q_cdata).clamp(args.cql_clip_diff_min, args.cql_clip_diff_max).mean(1)  # [2]
    if args.cql_lagrange:  # alpha' grows while the gap exceeds the target: max_{alpha'} alpha' (gap - target)
        alpha_prime = agent.log_alpha_prime.exp().clamp(0.0, 1e6)
        cql_loss = (alpha_prime.detach() * cql_alpha * (gap - args.cql_target_action_gap)).sum()
        alpha_prime_loss = -0.5 * (alpha_prime * cql_alpha * (gap.detach() - args.cql_target_action_gap)).sum()
    else:
        alpha_prime = torch.ones((), device=a.device)
        cql_loss = cql_alpha * gap.sum()
        alpha_prime_loss = torch.zeros((), device=a.device)
    critic_loss = td_loss + cql_loss

    if not args.fused_update:  # the textbook order (CORL): temperature, actor, then critics and alpha'
        for names, loss in ((("alpha",), alpha_loss), (("actor",), actor_loss),
                            (("q", "alpha_prime"), critic_loss + alpha_prime_loss)):
            for k in names:  # (the actor's backward also reaches the critics: zeroed before the critics' own)
                opts[k].zero_grad(set_to_none=True)
            loss.backward()
            for k in names:
                opts[k].step()
        with torch.no_grad():  # Polyak averaging of the target critics: theta' <- (1 - tau) theta' + tau theta
            for p_target, p in zip(agent.q_target.parameters(), agent.qf.parameters()):
                p_target.mul_(1.0 - args.tau).add_(p, alpha=args.tau)
    else:  # --fused-update: each loss routed to its own parameters, then one Adam step (tested equal to the above)
        opt = opts["calql"]
        opt.zero_grad(set_to_none=True)
        actor_params = list(agent.actor.parameters()) + [agent.log_alpha]
        for p, g in zip(actor_params, torch.autograd.grad(actor_loss + alpha_loss, actor_params)):
            p.grad = g  # torch.autograd.grad leaves the critics' gradients alone
        (critic_loss + alpha_prime_loss).backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(agent.q_target.parameters()), list(agent.qf.parameters()), args.tau)
    return {"losses/td_loss": td_loss.detach(), "losses/cql_loss": cql_loss.detach(),
            "losses/cql_gap": gap.detach().mean(), "losses/actor_loss": actor_loss.detach(),
            "losses/alpha": alpha, "losses/alpha_loss": alpha_loss.detach(), "losses/alpha_prime": alpha_prime.detach(),
            "losses/q_data_mean": q_data.detach().mean(), "losses/q_ood_lse": ood.detach().mean(),
            "losses/log_pi": logp.detach().mean(), "losses/calibration_bound_rate": bound_rate}


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: Cal-QL's calibration bound in the replay buffers (main() calls calql_update directly)
# ---------------------------------------------------------------------------------------------------------------
BUFFER_EXTRA: dict = {"mc_returns": -INF}  # per-row Monte-Carlo return; -inf = no calibration bound (synthetic data)


def cql_rows_batch(batch: dict, n_syn: int, n_off: int, offline: ReplayBuffer, args: Args,
                   generator: torch.Generator) -> Optional[dict]:
    """The rows of the CQL regulariser (and of alpha') for an EDIS batch [n_syn synthetic | online | n_off offline].

    all: None, i.e. the whole batch (the paper: synthetic rows count as data). real: the rows after the synthetic
    ones. base: those plus offline rows drawn for the regulariser only, until offline rows are --mixing-ratio of them:
    the data mix that Cal-QL's fine-tuning, and its Lagrange target gap, has without EDIS (docs/edis_calql.md,
    detail 10).
    """
    if args.cql_rows == "all":
        return None
    real = {k: v[n_syn:] for k, v in batch.items()}
    n_on = len(real["rewards"]) - n_off
    n_extra = round(n_on * args.mixing_ratio / (1.0 - args.mixing_ratio)) - n_off  # offline / all = mixing_ratio
    if args.cql_rows == "real" or n_extra <= 0:
        return real
    return concat_batches(real, offline.sample(n_extra, generator))


def failure_reward(args: Args, norm: dict) -> Optional[float]:
    """The transformed value of a raw reward of 0, i.e. of a step that did not reach the goal (sparse tasks only)."""
    return norm["reward_bias"] if args.is_sparse_reward else None


def online_mc_returns(online: ReplayBuffer, rows: torch.Tensor, args: Args, norm: dict) -> None:
    """With --calibration-online: write a finished online episode's Monte-Carlo returns into its buffer rows (official
    Cal-QL). Rows of unfinished episodes keep -inf, i.e. no bound; without the flag nothing is written (CORL)."""
    if not (args.calibration and args.calibration_online) or len(rows) == 0:
        return
    rewards = online.data["rewards"][rows].cpu().numpy()
    ends = np.zeros(len(rows), dtype=bool)
    ends[-1] = True
    online.data["mc_returns"][rows] = torch.as_tensor(
        mc_returns(rewards, ends, args.gamma, failure_reward(args, norm)), device=online.device)


# >>> shared:edis
# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: EDIS (Liu et al. 2024): a diffusion model of transitions whose samples are steered by learned energies
# ---------------------------------------------------------------------------------------------------------------
# A transition is one vector x = [s, a, r, s', terminal] (states already RL-normalised, rewards transformed),
# standardised per dimension by TransitionCodec (the binary terminal is left as 0/1). The diffusion prior p(x) is
# fitted on offline + online replay; the target is q(x) = d_pi(s) pi(a|s) T(s'|s,a) (EDIS Sec. 4), i.e.
#     q(x) = p(x) * exp(-E_s - E_pi - E_T),  E_s = -log d_pi(s)/d_p(s),  E_pi = -log pi(a|s)/mu(a|s),
#                                            E_T = -log T(s'|s,a)/T_hat(s'|s,a)                       (EDIS Sec. 4).
# The sampler needs these energies at every noise level sigma. The exact intermediate energy (CEP, Lu et al. 2023,
# Thm. 3.1) is E_sigma(x_sigma) = -log E_{p(x0 | x_sigma)}[exp(-E(x0))]: a function of the WHOLE noisy transition
# even when E(x0) depends on s0 only, because the posterior of x0 couples the blocks. So every energy here is a
# network of the full noisy x and sigma, trained by InfoNCE on noisy positives/negatives (CEP Sec. 4: the
# contrastive minimiser is E_sigma up to a constant), and guidance uses its full gradient grad_x.
# Each factor is a log-ratio of two distributions that differ ONLY in that factor, so its contrastive negatives
# must come from a valid conditional sampler of the prior: the denoiser is trained with random conditioning masks
# (s given, or (s, a) given, CSDI-style; Tashiro et al. 2021), so one network samples p(x), p(a,r,s'|s) and
# p(r,s'|s,a) without the errors of replacement in-painting.
class TransitionCodec:
    """Block layout of a transition vector and its per-dimension standardisation (refitted at each retrain)."""

    def __init__(self, obs_dim: int, act_dim: int, device: torch.device):
        S, A = obs_dim, act_dim
        self.obs_dim, self.act_dim, self.dim = S, A, 2 * S + A + 2
        self.s, self.a, self.r = slice(0, S), slice(S, S + A), slice(S + A, S + A + 1)
        self.s2, self.d = slice(S + A + 1, 2 * S + A + 1), slice(2 * S + A + 1, 2 * S + A + 2)
        self.mean = torch.zeros(self.dim, device=device)
        self.std = torch.ones(self.dim, device=device)

    def mask(self, *blocks: slice) -> torch.Tensor:
        m = torch.zeros(self.dim, device=self.mean.device)
        for b in blocks:
            m[b] = 1.0
        return m

    def cond_masks(self) -> torch.Tensor:
        """[3, D] conditioning masks of the denoiser: nothing given, s given, (s, a) given."""
        return torch.stack([self.mask(), self.mask(self.s), self.mask(self.s, self.a)])

    def raw(self, batch: dict) -> torch.Tensor:
        return torch.cat([batch["observations"], batch["actions"], batch["rewards"][:, None],
                          batch["next_observations"], batch["terminals"][:, None]], -1)

    def fit(self, x_raw: torch.Tensor) -> None:
        self.mean = x_raw.mean(0)
        self.std = x_raw.std(0).clamp(min=1e-3)  # constant dimensions stay finite
        # the terminal stays 0/1 (SynthER): standardising a rare binary flag makes it a 20-30 sigma outlier
        self.mean[self.d], self.std[self.d] = 0.0, 1.0

    def encode(self, batch: dict) -> torch.Tensor:
        return (self.raw(batch) - self.mean) / self.std

    def decode(self, x: torch.Tensor) -> dict:
        y = x * self.std + self.mean
        return {"observations": y[:, self.s], "actions": y[:, self.a], "rewards": y[:, self.r.start],
                "next_observations": y[:, self.s2], "terminals": (y[:, self.d.start] > 0.5).float()}

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "std": self.std.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std = state["mean"].to(self.mean.device), state["std"].to(self.mean.device)


# --- EDM (Karras et al. 2022, Table 1): preconditioning, loss, noise schedule, stochastic Heun sampler -------------
SIGMA_DATA, SIGMA_MIN, SIGMA_MAX, RHO = 1.0, 0.002, 80.0, 7.0
P_MEAN, P_STD, S_TMIN, S_TMAX, S_NOISE = -1.2, 1.2, 0.05, 50.0, 1.003


def edm_coefficients(sigma: torch.Tensor) -> tuple:
    """Table 1 (EDM column): c_skip, c_out, c_in, c_noise for D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)."""
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
    c_in = 1.0 / (sigma**2 + SIGMA_DATA**2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class FourierEmbedding(nn.Module):
    """Random Fourier features of the scalar noise input c_noise (fixed frequencies), then an MLP."""

    def __init__(self, out_dim: int, n_freq: int = 16):
        super().__init__()
        self.register_buffer("freq", torch.randn(n_freq) * 2.0 * math.pi)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq + 1, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        f = c[:, None] * self.freq[None]
        return self.mlp(torch.cat([c[:, None], f.sin(), f.cos()], -1))


class InputFeatures(nn.Module):
    """[x, sin(2^k pi u_j), cos(2^k pi u_j) for k < octaves] with u = x (every input dimension) or u = P x (``proj``
    [J, D]: J chosen linear combinations), the positional encoding of NeRF. An MLP of raw coordinates learns
    high-frequency functions slowly (spectral bias; Tancik et al. 2020, "Fourier features let networks learn high
    frequency functions"): sharp features of the data, such as PointMaze states piling up at the contact line of a
    wall, come out smeared by a few hundredths. octaves = 0: x alone.
    With ``noise_std`` (the std of the i.i.d. noise in each dimension of x, per row), each feature is replaced by its
    expectation under that noise: u_j gets noise of std s_j = noise_std |P_j|, and E[sin(w (u + n))] =
    sin(w u) exp(-w^2 s_j^2 / 2) (the integrated positional encoding of Mip-NeRF, Barron et al. 2021): frequencies the
    noise has washed out are damped instead of feeding the network noise, and the gradient stays bounded,
    max_w w exp(-w^2 s^2 / 2) = 1 / (s sqrt(e))."""

    def __init__(self, octaves: int = 0, proj: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("freq", 2.0 ** torch.arange(octaves) * math.pi, persistent=False)
        self.register_buffer("proj", proj, persistent=False)  # None: u = x

    def out_dim(self, dim: int) -> int:
        return dim + 2 * len(self.freq) * (dim if self.proj is None else len(self.proj))

    def forward(self, x: torch.Tensor, noise_std: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(self.freq) == 0 or (self.proj is not None and len(self.proj) == 0):
            return x
        u = x if self.proj is None else x @ self.proj.T
        f = u[..., None] * self.freq  # [B, J, octaves]
        sin, cos = f.sin(), f.cos()
        if noise_std is not None:
            scale = 1.0 if self.proj is None else self.proj.norm(dim=1)[:, None]  # [J, 1]: the noise std of u_j
            damp = torch.exp(-0.5 * (self.freq * scale * noise_std[:, None, None]) ** 2)
            sin, cos = sin * damp, cos * damp
        return torch.cat([x, sin.flatten(-2), cos.flatten(-2)], -1)


class ResidualMLPDenoiser(nn.Module):
    """F_theta(x, mask, c_noise): SynthER/EDIS residual MLP (width x depth, h <- h + Linear(act(LayerNorm(h)))).
    ``mask`` marks the dimensions given as a clean condition (all zero: unconditional). ``octaves`` > 0 adds
    sin/cos features of the (scaled) input (``InputFeatures``; not in SynthER or EDIS)."""

    def __init__(self, dim: int, width: int, depth: int, octaves: int = 0):
        super().__init__()
        self.features = InputFeatures(octaves)
        self.inp = nn.Linear(self.features.out_dim(dim) + dim, width)
        self.temb = FourierEmbedding(width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([self.features(x), mask], -1)) + self.temb(c_noise)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def edm_denoise(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras Eq. 7); sigma: [B]. Dimensions where ``mask`` is 1
    hold a clean condition: they enter unscaled and are returned unchanged (so the sampler never moves them)."""
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    mask = torch.zeros_like(x) if mask is None else mask.expand_as(x)
    given = mask.bool()
    d = c_skip[:, None] * x + c_out[:, None] * net(torch.where(given, x, c_in[:, None] * x), mask, c_noise)
    return torch.where(given, x, d)


def edm_loss(net: nn.Module, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Karras Eq. 8 with ln(sigma) ~ N(P_mean, P_std^2) and weight lambda = (sigma^2 + sd^2) / (sigma sd)^2; the
    dimensions given as a condition (``mask`` [B, D]) stay clean and add nothing to the loss."""
    n = torch.randn(x0.shape[0], device=x0.device, generator=generator)
    sigma = (P_MEAN + P_STD * n).exp()
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    x = x0 + sigma[:, None] * noise
    if mask is not None:
        x = torch.where(mask.bool(), x0, x)
    d = edm_denoise(net, x, sigma, mask)
    return (weight[:, None] * (d - x0).pow(2)).mean()


def karras_sigmas(n_steps: int, device: torch.device) -> torch.Tensor:
    """Karras Eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N, and sigma_N = 0."""
    i = torch.arange(n_steps, device=device, dtype=torch.float32)
    s = (SIGMA_MAX ** (1 / RHO) + i / max(n_steps - 1, 1) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return torch.cat([s, torch.zeros(1, device=device)])


GuidanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def edm_sample(net: nn.Module, n: int, dim: int, n_steps: int, generator: torch.Generator, churn: float = 80.0,
               guidance: Optional[GuidanceFn] = None, known: Optional[torch.Tensor] = None,
               known_mask: Optional[torch.Tensor] = None, stats: Optional[dict] = None,
               guide_sigma_max: float = math.inf) -> torch.Tensor:
    """Stochastic Heun sampler (Karras Alg. 2) with energy guidance, unconditional or conditional.

    Guided direction (EDIS Sec. 4 with CEP's exact intermediate energy): the probability-flow ODE of
    q_sigma = p_sigma exp(-E_sigma) is dx/dsigma = -sigma grad log q_sigma =
        d = (x - D(x; sigma)) / sigma + sigma * grad_x E(x, sigma),
    with ``guidance(x, sigma)`` returning grad_x of the weighted energies, applied where sigma <= guide_sigma_max.
    Conditional sampling: the dimensions where ``known_mask`` is 1 are set to ``known`` and given to the denoiser as
    a condition; D returns them unchanged and no churn noise is added there, so they stay exactly at ``known``.
    """
    device = next(net.parameters()).device
    sigmas = karras_sigmas(n_steps, device)
    mask = torch.zeros(dim, device=device) if known_mask is None else known_mask.to(device)
    x = torch.randn(n, dim, device=device, generator=generator) * sigmas[0]
    if known is not None:
        x = torch.where(mask.bool(), known, x)

    def direction(x_: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((n,), sigma, device=device)
        with torch.no_grad():
            d = (x_ - edm_denoise(net, x_, sig, mask)) / sigma
        if guidance is None or sigma > guide_sigma_max:
            return d
        g = sigma * guidance(x_, sig) * (1.0 - mask)
        if stats is not None:
            stats["guidance_norm"] += g.norm(dim=-1).mean()
            stats["denoiser_norm"] += d.norm(dim=-1).mean()
            stats["n"] += 1
        return d + g

    for i in range(n_steps):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(churn / n_steps, math.sqrt(2.0) - 1.0) if S_TMIN <= s_cur <= S_TMAX else 0.0
        s_hat = s_cur * (1.0 + gamma)
        if gamma > 0:  # add noise to move from sigma_i up to sigma_hat (not on the given dimensions)
            eps = torch.randn(x.shape, device=device, generator=generator) * S_NOISE * (1.0 - mask)
            x = x + math.sqrt(s_hat**2 - s_cur**2) * eps
        d = direction(x, s_hat)
        x_next = x + (s_next - s_hat) * d  # Euler step
        if s_next > 0:  # Heun correction (2nd order)
            d2 = direction(x_next, s_next)
            x_next = x + (s_next - s_hat) * 0.5 * (d + d2)
        x = x_next
    return x


class EnergyNet(nn.Module):
    """E_phi(x, sigma): an MLP of the full noisy transition, input-scaled like the denoiser (c_in(sigma) x), and
    c_noise(sigma) -> scalar. Without the scaling, inputs at sigma = 80 are ~80x larger than at sigma ~ 0.
    ``octaves`` > 0: sin/cos features of the scaled input (of its projections ``proj``, every dimension when None),
    as the denoiser's, but at their expected value under the input's noise (std c_in(sigma) sigma), so high
    frequencies fade out as sigma grows (``InputFeatures``)."""

    def __init__(self, dim: int, hidden: int, octaves: int = 0, proj: Optional[torch.Tensor] = None):
        super().__init__()
        self.features = InputFeatures(octaves, proj)
        self.net = mlp(self.features.out_dim(dim) + 1, 1, hidden, n_hidden=3)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _, _, c_in, c_noise = edm_coefficients(sigma)
        feats = self.features(c_in[:, None] * x, noise_std=c_in * sigma)
        return self.net(torch.cat([feats, c_noise[:, None]], -1)).squeeze(-1)


# The energies of each design (--edis-energies). "factored": the paper's three factors, each the log-ratio of two
# distributions that differ only in that factor (EDIS Sec. 4). "joint": one energy, online transitions vs the
# prior, i.e. -log d_on(s) mu_on(a|s) T(s'|s,a) / p(x) with the online data's own (recent) behaviour policy.
ENERGY_DESIGNS = {"factored": ("state", "policy", "transition"), "joint": ("online",)}


def guidance_weights(args: Args) -> dict:
    return {"state": args.guide_state, "policy": args.guide_policy, "transition": args.guide_transition,
            "online": args.guide_online, "realism": args.guide_realism}


def energy_names(args: Args) -> tuple:
    """The energies a run trains: its design's, plus the realism energy when it is used."""
    return ENERGY_DESIGNS[args.edis_energies] + (("realism",) if args.guide_realism != 0.0 else ())


def make_energies(dim: int, names: tuple, hidden: int, device: torch.device, octaves: int = 0,
                  proj: Optional[torch.Tensor] = None) -> nn.ModuleDict:
    return nn.ModuleDict({k: EnergyNet(dim, hidden, octaves, proj) for k in names}).to(device)


POSITION_COARSENING = 4  # midpoint+position: s's and s''s own position features are 2^this coarser


def energy_feature_proj(args: Args, codec: "TransitionCodec") -> Optional[torch.Tensor]:
    """What the energies' sin/cos features see (--energy-octave-dims), as rows of a projection of the transition
    (None: every dimension). The task's maze position (x, y) (TaskSpec.position_dims; none outside mazes) is what
    the walls depend on:
      midpoint:           ((x + x') / 2, (y + y') / 2), the transition's place. A feature of it has the same gradient
                          for s and s', so its guidance translates the transition as a whole and keeps its step s' - s
                          (PointMaze's dynamics are translation-invariant away from walls); features of x and x'
                          apart pull them apart.
      position:           x, y, x', y' separately.
      midpoint+position:  the midpoint, plus x, y, x', y' apart at frequencies 2^POSITION_COARSENING times lower (rows
                          scaled down): s and s' each feel the walls, but only at scales too coarse to bend the step.
      all:                every dimension."""
    mode = args.energy_octave_dims
    if mode == "all":
        return None
    obs = get_task(args.env).position_dims
    mid = [{codec.s.start + i: 0.5, codec.s2.start + i: 0.5} for i in obs]
    apart = [{start + i: 1.0} for i in obs for start in (codec.s.start, codec.s2.start)]  # x, x', y, y'
    coarse = [{k: v * 2.0**-POSITION_COARSENING for k, v in row.items()} for row in apart]
    chosen = {"midpoint": mid, "position": apart, "midpoint+position": mid + coarse}[mode]
    rows = torch.zeros(len(chosen), codec.dim)
    for j, row in enumerate(chosen):
        for k, v in row.items():
            rows[j, k] = v
    return rows.to(codec.mean.device)


def make_guidance(energies: nn.ModuleDict, weights: dict) -> Optional[GuidanceFn]:
    """grad_x sum_k lambda_k E_k(x, sigma): the full gradient w.r.t. the whole noisy transition (CEP Thm. 3.1)."""
    active = {k: weights[k] for k in energies if weights[k] != 0.0}
    if not active:
        return None

    def guidance(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            e = sum(w * energies[k](x, sigma).sum() for k, w in active.items())
            (g,) = torch.autograd.grad(e, x)
        return g

    return guidance


def infonce_loss(energy: nn.Module, pos: torch.Tensor, neg: torch.Tensor, sigma: torch.Tensor,
                 generator: torch.Generator) -> tuple:
    """Contrastive energy prediction: one positive, K negatives per group, all noised at the group's sigma.

    pos [G, d], neg [G, K, d], sigma [G]. L = -log exp(-E(x+)) / (exp(-E(x+)) + sum_j exp(-E(x-_j))), whose minimiser
    is E(x, sigma) = -log q_sigma(x) / p_sigma(x) + c(sigma) (CEP, Lu et al. 2023, Sec. 4: with unlimited capacity
    the contrastive objective recovers the exact intermediate energy). Returns (loss, accuracy).
    """
    G, K, d = neg.shape
    x = torch.cat([pos[:, None], neg], 1)  # [G, 1 + K, d], the positive first
    x = x + sigma[:, None, None] * torch.randn(x.shape, device=x.device, generator=generator)
    e = energy(x.reshape(G * (K + 1), d), sigma.repeat_interleave(K + 1)).view(G, K + 1)
    target = torch.zeros(G, dtype=torch.long, device=x.device)
    loss = F.cross_entropy(-e, target)
    acc = (e.argmin(1) == 0).float().mean()
    return loss, acc


# noise bands in which each energy's held-out InfoNCE accuracy is logged (edis/energy_acc_<name>_sigma<lo>-<hi>)
SIGMA_BANDS = ((0.0, 0.1), (0.1, 1.0), (1.0, 5.0), (5.0, SIGMA_MAX + 1.0))


@dataclasses.dataclass
class EDISState:
    """What EDIS keeps between retrains (all of it goes into checkpoints)."""

    codec: TransitionCodec
    energies: nn.ModuleDict
    energy_opt: torch.optim.Optimizer
    synthetic: Optional[ReplayBuffer] = None
    retrains: int = 0
    last_retrain_step: int = -1


def new_edis_state(obs_dim: int, act_dim: int, args: Args, device: torch.device) -> EDISState:
    codec = TransitionCodec(obs_dim, act_dim, device)
    energies = make_energies(codec.dim, energy_names(args), args.energy_hidden, device, args.energy_octaves,
                             energy_feature_proj(args, codec))
    return EDISState(codec, energies, torch.optim.Adam(energies.parameters(), lr=args.energy_lr))


def ema_decay(step: int, max_decay: float) -> float:
    """EMA decay with warm-up, as the EMA library of the official code (ema-pytorch, power 2/3):
    min(max_decay, 1 - (1 + step)^(-2/3)), 0 at the first step, so the random initialisation is forgotten at once
    (a constant 0.999 would keep exp(-3) = 5 % of it after 3,000 steps)."""
    return min(max_decay, 1.0 - (1.0 + step) ** (-2.0 / 3.0))


def diffusion_rows(n_rows: int, n_online: int, n: int, args: Args, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """n row indices of a diffusion training batch: the last n_online rows are online transitions, drawn with
    probability --edis-online-frac (0: uniform over all rows, as the official code)."""
    if 0 < n_online < n_rows and args.edis_online_frac > 0:
        off = torch.randint(0, n_rows - n_online, (n,), device=device, generator=generator)
        on = torch.randint(n_rows - n_online, n_rows, (n,), device=device, generator=generator)
        return torch.where(torch.rand(n, device=device, generator=generator) < args.edis_online_frac, on, off)
    return torch.randint(0, n_rows, (n,), device=device, generator=generator)


def train_diffusion(x: torch.Tensor, args: Args, generator: torch.Generator,
                    cond_masks: Optional[torch.Tensor] = None, n_online: int = 0) -> tuple:
    """Fit a fresh denoiser on the normalised transitions x [N, D] (EDM loss, AdamW, cosine lr, grad clip 1, EMA).

    The last ``n_online`` rows of x are online transitions (batches: ``diffusion_rows``).

    With ``cond_masks`` [M, D] (row 0 all zero), a fraction --edis-cond-prob of the training rows get one of the
    other masks (uniformly) as a clean condition, so the same network samples conditionals too.
    The sampling weights are an EMA with warm-up (``ema_decay``).
    """
    shape = (x.shape[1], args.edis_width, args.edis_depth, args.edis_octaves)
    net, ema = ResidualMLPDenoiser(*shape).to(x.device), ResidualMLPDenoiser(*shape).to(x.device)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.edis_diffusion_lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.edis_diffusion_steps)
    losses = torch.zeros(args.edis_diffusion_steps, device=x.device)
    B = args.edis_diffusion_batch
    for step in range(args.edis_diffusion_steps):
        idx = diffusion_rows(x.shape[0], n_online, B, args, generator, x.device)
        mask = None
        if cond_masks is not None:  # row 0 (unconditional) with prob 1 - cond_prob, else one of the others
            u = torch.rand(B, device=x.device, generator=generator)
            which = torch.randint(1, len(cond_masks), (B,), device=x.device, generator=generator)
            mask = cond_masks[torch.where(u < args.edis_cond_prob, which, torch.zeros_like(which))]
        loss = edm_loss(net, x[idx], generator, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = ema_decay(step, args.edis_ema)
        with torch.no_grad():  # Polyak average: ema <- decay * ema + (1 - decay) * net
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.mul_(decay).add_(p, alpha=1.0 - decay)
        losses[step] = loss.detach()
    return ema, losses


def sample_chunked(net: nn.Module, n: int, dim: int, args: Args, generator: torch.Generator, **kw) -> torch.Tensor:
    out, known = [], kw.pop("known", None)
    for start in range(0, n, args.edis_sample_batch):
        m = min(args.edis_sample_batch, n - start)
        k = known[start:start + m] if known is not None else None
        out.append(edm_sample(net, m, dim, args.edis_sample_steps, generator, args.edis_churn, known=k, **kw))
    return torch.cat(out)


def contrastive_sets(names: tuple, denoiser: nn.Module, codec: TransitionCodec, x_on: torch.Tensor,
                     x_pi: torch.Tensor, x_data: torch.Tensor, K: int, args: Args, generator: torch.Generator) -> dict:
    """Positives [M, D] and negatives [M, K, D] of each energy in ``names`` (normalised, clean: noise comes later).

    x_on: M real online transitions; x_pi: the same rows with a ~ pi(.|s) from the current policy (only s, a used);
    x_data: M rows drawn as the denoiser's training batches are (offline and online, --edis-online-frac).
    Each energy's positives and negatives share everything except the factor it measures (EDIS Sec. 4):
      state       d_on(s)/d_p(s):      [s_on, (a,r,s',d) ~ p(.|s_on)]      vs  x ~ p(x)
      policy      pi(a|s)/mu(a|s):     [s, a_pi, (r,s',d) ~ p(.|s,a_pi)]   vs  [s, (a,r,s',d) ~ p(.|s)]
      transition  T/T_hat(s'|s,a):     real online (s, a, r, s', d)        vs  [s, a, (r,s',d) ~ p(.|s,a)]
      online (joint design)            real online (s, a, r, s', d)        vs  x ~ p(x)
      realism     p_data(x)/p(x):      x ~ the denoiser's training data    vs  x ~ p(x)
    The realism energy corrects the prior's own errors (states in walls, wrong s' for (s, a)) toward its training
    data, whatever the online data are (discriminator guidance, Kim et al. 2023).
    """
    M, D = x_on.shape
    masks = codec.cond_masks()

    def prior(n: int, given: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return sample_chunked(denoiser, n, D, args, generator, known=given, known_mask=mask)

    rep = lambda t: t.repeat_interleave(K, 0)  # noqa: E731  (K copies of each row, one per negative)
    uncond = prior(M * K).view(M, K, D)
    sets = {"realism": (x_data, uncond)} if "realism" in names else {}
    if "online" in names:
        return {"online": (x_on, uncond), **sets}
    given_s = prior(M * K, rep(x_on), masks[1]).view(M, K, D)  # K draws of (a, r, s', d) | s_on
    given_s_pi = prior(M, x_pi, masks[2])  # (r, s', d) | s, a_pi
    given_sa = prior(M * K, rep(x_on), masks[2]).view(M, K, D)  # K draws of (r, s', d) | s, a
    return {"state": (given_s[:, 0], uncond), "policy": (given_s_pi, given_s), "transition": (x_on, given_sa), **sets}


def train_energies(state: EDISState, denoiser: nn.Module, online: ReplayBuffer, policy_sample: Callable, args: Args,
                   generator: torch.Generator, x_train: torch.Tensor) -> dict:
    """InfoNCE training of the energies at the noise levels the sampler visits (CEP Sec. 4; EDIS Sec. 4).

    --energy-pool online transitions are drawn; 4/5 of them (with their K negatives each) train the energies for
    --energy-steps steps, 1/5 are held out to measure each energy's accuracy per noise band. ``x_train``: the
    denoiser's normalised training rows (online rows last), the realism energy's positives.
    """
    codec, K, M = state.codec, args.energy_negatives, args.energy_pool
    device = codec.mean.device
    pos_batch = online.sample(M, generator)
    with torch.no_grad():
        x_on = codec.encode(pos_batch)
        x_pi = codec.encode(dict(pos_batch, actions=policy_sample(pos_batch["observations"])))
        x_data = x_train[diffusion_rows(len(x_train), online.size, M, args, generator, device)]
        sets = contrastive_sets(tuple(state.energies), denoiser, codec, x_on, x_pi, x_data, K, args, generator)
    # the sampler's noise levels at which guidance is applied (sigma <= --guide-sigma-max): training elsewhere would
    # spend the energies' capacity and samples on levels whose gradient is never used
    sigmas = karras_sigmas(args.edis_sample_steps, device)[:-1]
    sigmas = sigmas[sigmas <= max(args.guide_sigma_max, float(sigmas.min()))]
    n_train = max(M - M // 5, 1)
    G = min(args.energy_batch, n_train)
    metrics = {}
    for k in state.energies:
        metrics[f"edis/energy_loss_{k}"] = torch.zeros((), device=device)
        metrics[f"edis/energy_acc_{k}"] = torch.zeros((), device=device)
    for _ in range(args.energy_steps):
        groups = torch.randint(0, n_train, (G,), device=device, generator=generator)
        sigma = sigmas[torch.randint(0, len(sigmas), (G,), device=device, generator=generator)]
        loss_total = 0.0
        for k, (pos, neg) in sets.items():
            loss, acc = infonce_loss(state.energies[k], pos[groups], neg[groups], sigma, generator)
            loss_total = loss_total + loss
            metrics[f"edis/energy_loss_{k}"] += loss.detach() / args.energy_steps
            metrics[f"edis/energy_acc_{k}"] += acc / args.energy_steps
        state.energy_opt.zero_grad(set_to_none=True)
        loss_total.backward()
        state.energy_opt.step()
    held = torch.arange(n_train, M, device=device)
    with torch.no_grad():  # held-out accuracy per noise band (chance: 1 / (K + 1))
        for lo, hi in SIGMA_BANDS:
            band = sigmas[(sigmas >= lo) & (sigmas < hi)]
            if len(held) == 0 or len(band) == 0:
                continue
            sigma = band[torch.randint(0, len(band), (len(held),), device=device, generator=generator)]
            for k, (pos, neg) in sets.items():
                _, acc = infonce_loss(state.energies[k], pos[held], neg[held], sigma, generator)
                metrics[f"edis/energy_acc_{k}_sigma{lo:g}-{min(hi, SIGMA_MAX):g}"] = acc
    return metrics


def fit_reward_model(x_raw: torch.Tensor, codec: TransitionCodec, args: Args, generator: torch.Generator) -> tuple:
    """Optional (--edis-reward-model): r_psi(s, a, s') fitted by MSE, to relabel synthetic rewards (paper Sec. 4:
    the target excludes r because the reward is "accessible ... or learned from the dataset")."""
    ins = torch.cat([x_raw[:, codec.s], x_raw[:, codec.a], x_raw[:, codec.s2]], -1)
    model = mlp(ins.shape[1], 1, args.hidden_dim).to(x_raw.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.zeros((), device=x_raw.device)
    for _ in range(max(args.edis_diffusion_steps // 2, 1)):
        idx = torch.randint(0, len(ins), (args.batch_size,), device=x_raw.device, generator=generator)
        loss = (model(ins[idx]).squeeze(-1) - x_raw[idx, codec.r.start]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, loss.detach()


def needs_conditionals(args: Args) -> bool:
    """Whether the denoiser must also learn p(. | s) and p(. | s, a) (conditioning masks in training)."""
    return args.edis_energies == "factored" or args.edis_sampler == "sequential"


def generate(state: EDISState, denoiser: nn.Module, n: int, args: Args, generator: torch.Generator,
             stats: Optional[dict] = None, guided: bool = True) -> torch.Tensor:
    """n normalised synthetic transitions from q(s, a, r, s', d) = p(x) exp(-sum_k lambda_k E_k) (EDIS Eq. 5-6).

    joint (the paper's sampler): one guided pass over the whole transition, with grad_x of every energy.
    sequential: the same target, sampled factor by factor, q = q(s, a) q(r, s', d | s, a):
      1. (s, a) ~ p(s, a) exp(-E_s - E_pi): a guided joint pass whose (r, s', d) are dropped. E_T is left out because
         it is a log-ratio of two conditionals of s', so it integrates out of the (s, a) marginal.
      2. (r, s', d) ~ p(r, s', d | s, a) exp(-E_T): the conditional denoiser (the one trained on all real
         transitions) given the clean (s, a) of pass 1, guided by E_T on the generated dimensions only.
    Built because the conditional denoiser given *real* (s, a) gets s' 3x more right than joint samples; measured
    (docs/results.md, study 3), given *generated* (s, a) it is barely better and its rewards are worse: not the default.
    """
    codec, weights = state.codec, guidance_weights(args)
    guide = lambda w: make_guidance(state.energies, w) if guided else None  # noqa: E731
    kw = dict(stats=stats, guide_sigma_max=args.guide_sigma_max)
    if args.edis_sampler == "joint":
        return sample_chunked(denoiser, n, codec.dim, args, generator, guidance=guide(weights), **kw)
    x_sa = sample_chunked(denoiser, n, codec.dim, args, generator, guidance=guide(dict(weights, transition=0.0)), **kw)
    only_t = {k: (w if k == "transition" else 0.0) for k, w in weights.items()}
    return sample_chunked(denoiser, n, codec.dim, args, generator, known=x_sa, known_mask=codec.mask(codec.s, codec.a),
                          guidance=guide(only_t), **kw)


def edis_retrain(state: EDISState, offline: ReplayBuffer, online: ReplayBuffer, policy_sample: Callable, args: Args,
                 generator: torch.Generator) -> dict:
    """One EDIS round: fresh diffusion on offline + online replay, energy training, guided generation."""
    t0 = time.time()
    codec = state.codec
    x_raw = torch.cat([codec.raw(offline.rows()), codec.raw(online.rows())])
    codec.fit(x_raw)
    cond = codec.cond_masks() if needs_conditionals(args) else None  # conditionals only where needed
    x_train = (x_raw - codec.mean) / codec.std
    denoiser, diff_losses = train_diffusion(x_train, args, generator, cond, online.size)
    metrics = train_energies(state, denoiser, online, policy_sample, args, generator, x_train)
    stats = {"guidance_norm": 0.0, "denoiser_norm": 0.0, "n": 0}
    x = generate(state, denoiser, args.edis_num_samples, args, generator, stats=stats)
    syn = codec.decode(x.detach())
    if args.edis_reward_model:
        model, rm_loss = fit_reward_model(x_raw, codec, args, generator)
        with torch.no_grad():
            syn["rewards"] = model(torch.cat([syn["observations"], syn["actions"], syn["next_observations"]],
                                             -1)).squeeze(-1)
        metrics["edis/reward_model_loss"] = rm_loss
    syn["actions"] = syn["actions"].clamp(-1.0, 1.0)
    buf = ReplayBuffer(codec.obs_dim, codec.act_dim, args.edis_num_samples, codec.mean.device, extra=BUFFER_EXTRA)
    buf.add_batch(syn)
    state.synthetic, state.retrains = buf, state.retrains + 1
    real = online.rows()
    n = max(stats["n"], 1)
    metrics.update({
        "edis/diffusion_loss": diff_losses[-max(len(diff_losses) // 10, 1):].mean(),
        "edis/guidance_norm": stats["guidance_norm"] / n,
        "edis/denoiser_norm": stats["denoiser_norm"] / n,
        "edis/syn_reward_mean": syn["rewards"].mean(), "edis/online_reward_mean": real["rewards"].mean(),
        "edis/syn_terminal_rate": syn["terminals"].mean(), "edis/online_terminal_rate": real["terminals"].mean(),
        "edis/syn_state_mean_dist": (syn["observations"].mean(0) - real["observations"].mean(0)).norm(),
        "edis/syn_state_std_ratio": (syn["observations"].std(0) / real["observations"].std(0).clamp(min=1e-6)).mean(),
        "edis/retrain_time_s": torch.tensor(time.time() - t0),
    })
    return metrics
# <<< shared:edis


# >>> shared:eval
# ---------------------------------------------------------------------------------------------------------------
# BOILERPLATE: evaluation (D4RL normalized score, success rate)
# ---------------------------------------------------------------------------------------------------------------
def evaluate(task: TaskSpec, policy: Callable, episodes: int, seed: int, env=None,
             video_dir: Optional[str] = None) -> dict:
    """Run ``episodes`` deterministic episodes; env resets are seeded seed, seed+1, ... (the same starts each time).
    With ``video_dir``, the first episode is recorded there as an mp4 (gymnasium's RecordVideo, as CleanRL)."""
    own = env is None
    if video_dir is not None:
        env = gym.wrappers.RecordVideo(make_env(task, render_mode="rgb_array"), video_dir, name_prefix="eval",
                                       episode_trigger=lambda ep: ep == 0, disable_logger=True)
    env = env or make_env(task)
    returns, successes = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret, success = False, 0.0, False
        while not done:
            obs, r, terminated, truncated, info = env.step(policy(obs))
            ret += float(r)
            success |= bool(info.get("success", False))
            done = terminated or truncated
        returns.append(ret)
        successes.append(success)
    if own:
        env.close()
    scores = normalized_score(task, returns)
    return {"eval/normalized_score": float(scores.mean()), "eval/normalized_score_std": float(scores.std()),
            "eval/return": float(np.mean(returns)), "eval/success_rate": float(np.mean(successes))}
# <<< shared:eval


# >>> shared:checkpoint
# ---------------------------------------------------------------------------------------------------------------
# BOILERPLATE: checkpoints (atomic), logging helpers
# ---------------------------------------------------------------------------------------------------------------
CHECKPOINT = "checkpoint.pt"


def find_checkpoint(resume: str) -> str:
    path = resume if resume.endswith(".pt") else os.path.join(resume, CHECKPOINT)
    if not os.path.isfile(path):
        raise UserError(f"--resume {resume!r}: no checkpoint at {path}")
    return path


class Logger:
    """TensorBoard always; W&B only with --track (imported lazily). Metrics arrive as tensors and are synced in bulk."""

    def __init__(self, out_dir: str, args: Args, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(out_dir)
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs wandb: pip install wandb") from None
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=dataclasses.asdict(args), name=run_name, save_code=True, monitor_gym=True)
        table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        self.pending: dict = {}
        self.pending_steps: list = []

    def accumulate(self, metrics: dict, step: int) -> None:
        """Keep the update's metric tensors (no device sync) until the next flush; ``step`` = the update's number."""
        for k, v in metrics.items():
            self.pending.setdefault(k, []).append(v)
        self.pending_steps.append(step)

    def flush_pending(self, step: int) -> dict:
        """Average accumulated tensors with one device sync, write them, return the floats. A non-finite value stops
        the run (Diverged), naming the first update and metric where it appeared."""
        if not self.pending:
            return {}
        keys = list(self.pending)
        values = torch.stack([torch.stack(self.pending[k]).float() for k in keys])  # [metrics, updates]
        bad = ~torch.isfinite(values)
        if bad.any():
            first = int(bad.any(0).nonzero()[0])
            raise Diverged(f"non-finite {keys[int(bad[:, first].nonzero()[0])]} at step {self.pending_steps[first]}; "
                           "the run stops (lower the learning rates or check the data); its last checkpoint is kept")
        self.pending, self.pending_steps = {}, []
        out = dict(zip(keys, values.mean(1).tolist()))
        self.scalars(out, step)
        return out

    def scalars(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        self.writer.close()
# <<< shared:checkpoint


# >>> shared:main
# Flags that may change when a run is resumed: budgets, logging, hardware, learning rates (applied to the restored
# optimizers) and EDIS's online-phase settings (used from the next retrain; the denoiser is trained afresh each time,
# so e.g. one offline phase can be continued with and without EDIS). Any other flag given with --resume must equal the
# checkpoint's: the networks, the data and the algorithm were built from it.
RESUME_MAY_CHANGE = {"resume", "output_dir", "overwrite", "device", "torch_deterministic", "track",
                     "wandb_project_name", "wandb_entity", "compile", "bf16", "online_steps", "eval_every",
                     "eval_episodes", "checkpoint_every", "log_every", "critic_lr", "actor_lr", "capture_video",
                     "eval_only", "edis", "edis_ratio", "edis_offline_frac", "edis_retrain_every", "edis_min_online",
                     "edis_num_samples",
                     "edis_diffusion_steps", "edis_diffusion_batch", "edis_diffusion_lr", "edis_width", "edis_depth",
                     "edis_octaves", "edis_ema", "edis_sample_steps", "edis_sample_batch", "edis_churn", "guide_state",
                     "guide_policy", "guide_transition", "guide_online", "guide_realism", "guide_sigma_max",
                     "edis_cond_prob", "edis_online_frac", "edis_sampler",
                     "energy_negatives", "energy_pool", "energy_steps",
                     "energy_batch", "energy_lr", "edis_reward_model"} | ALGO_RESUME_MAY_CHANGE
# Flags added after checkpoints were first written, with the value that rebuilds the runs of those older versions
# (their saved flags lack them; the new default would build networks that do not fit their weights).
ADDED_FLAGS = {"edis_octaves": 0, "energy_octaves": 0, "energy_octave_dims": "all"}
# The energies' design: it may also change with --resume while the checkpoint's energies are untrained (no EDIS retrain
# yet; they are trained in the online phase only), so one offline phase can be continued with several energy designs.
# The energies are then built from the flags given now instead of loaded.
ENERGY_DESIGN_FLAGS = {"edis_energies", "energy_hidden", "energy_octaves", "energy_octave_dims"}


def energy_design(a: dict) -> tuple:
    """What decides the energy networks' shapes and features (the realism energy exists iff --guide-realism != 0)."""
    return tuple(a.get(k) for k in sorted(ENERGY_DESIGN_FLAGS)) + (a.get("guide_realism") != 0.0,)


def save_checkpoint(path: str, args: Args, step: int, agent: Agent, opts: dict, online: ReplayBuffer,
                    edis: EDISState, norm: dict, progress: dict, gen: torch.Generator) -> None:
    """Everything a resumed run needs to continue exactly: weights, optimizers, buffers, normalisation, RNG states.
    Tensors and plain Python values only, so loading it can never execute code (torch.load(weights_only=True))."""
    if not all(torch.isfinite(p).all() for p in agent.parameters()):
        raise Diverged(f"non-finite network parameters at step {step}; the run stops, its last checkpoint is kept")
    atomic_torch_save({
        "args": dataclasses.asdict(args), "step": step, "agent": agent.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in opts.items()}, "online_buffer": online.state_dict(),
        "edis": {"codec": edis.codec.state_dict(), "energies": edis.energies.state_dict(),
                 "energy_opt": edis.energy_opt.state_dict(), "retrains": edis.retrains,
                 "last_retrain_step": edis.last_retrain_step,
                 "synthetic": edis.synthetic.state_dict() if edis.synthetic is not None else None},
        "normalization": {k: torch.as_tensor(v) for k, v in norm.items()}, "progress": progress,
        "rng": get_rng_state(), "batch_generator": gen.get_state(),
    }, path)


def load_checkpoint(args: Args, argv: Optional[list]) -> tuple:
    """``--resume``: the checkpoint (loaded without executing anything) and the run's config, i.e. the saved flags
    overridden by the ones given now, which must be among RESUME_MAY_CHANGE."""
    path = find_checkpoint(args.resume)
    ckpt = safe_torch_load(path, f"--resume {args.resume}")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict):
        ckpt["args"] = {**ADDED_FLAGS, **ckpt["args"]}
    folder = os.path.dirname(os.path.abspath(path))
    untrained = isinstance(ckpt, dict) and isinstance(ckpt.get("edis"), dict) and ckpt["edis"].get("retrains") == 0
    may_change = RESUME_MAY_CHANGE | (ENERGY_DESIGN_FLAGS if untrained else set())
    args = resumed_args(Args, argv, ckpt, folder, may_change, f"--resume {args.resume}")
    newer = os.path.join(folder, CHECKPOINT)
    if args.output_dir == folder and os.path.abspath(path) != newer and os.path.isfile(newer):
        raise UserError(f"--resume {path}: continuing here would overwrite {newer}, the run's latest checkpoint; "
                        f"pass --output-dir NEW_FOLDER to continue from {os.path.basename(path)} there")
    return ckpt, args


def restore_checkpoint(ckpt: dict, args: Args, agent: Agent, opts: dict, online: ReplayBuffer, edis: EDISState,
                       gen: torch.Generator) -> tuple:
    """The inverse of save_checkpoint: load weights, optimizers, buffers, EDIS state and RNG states in place;
    returns (progress, step)."""
    try:  # a checkpoint of an older version, whose critics were one ensemble module
        agent.load_state_dict(ckpt["agent"])
    except RuntimeError:
        raise UserError(f"--resume {args.resume}: the checkpoint's networks do not fit this script's; it was written "
                        f"by an older version: start a new run") from None
    for k, o in opts.items():
        restore_optimizer(o, ckpt["optimizers"][k])
    if ckpt["online_buffer"]["size"] > online.capacity:
        raise UserError(f"--online-steps {args.online_steps} is smaller than the {ckpt['online_buffer']['size']} "
                        f"online steps the checkpoint already holds")
    online.load_state_dict(ckpt["online_buffer"])
    edis.codec.load_state_dict(ckpt["edis"]["codec"])
    if ckpt["edis"]["retrains"] == 0 and energy_design(ckpt["args"]) != energy_design(dataclasses.asdict(args)):
        print("untrained EDIS energies of another design in the checkpoint: built afresh from the flags given now")
    else:
        try:  # a checkpoint of an older version (energies of single blocks) or of another energy design
            edis.energies.load_state_dict(ckpt["edis"]["energies"])
            restore_optimizer(edis.energy_opt, ckpt["edis"]["energy_opt"])
        except (RuntimeError, ValueError, KeyError):
            raise UserError(f"--resume {args.resume}: the checkpoint's EDIS energies do not fit this script's "
                            f"({', '.join(edis.energies)}): resume with the --edis-energies and --guide-realism it "
                            f"was started with (0 if it had no realism energy), or start a new run if an older "
                            f"version wrote it") from None
    edis.retrains, edis.last_retrain_step = ckpt["edis"]["retrains"], ckpt["edis"]["last_retrain_step"]
    if ckpt["edis"]["synthetic"] is not None:
        obs_dim, act_dim = online.data["observations"].shape[1], online.data["actions"].shape[1]
        edis.synthetic = ReplayBuffer(obs_dim, act_dim, ckpt["edis"]["synthetic"]["size"], online.device,
                                      extra=BUFFER_EXTRA)
        edis.synthetic.load_state_dict(ckpt["edis"]["synthetic"])
    set_rng_state(ckpt["rng"])
    gen.set_state(ckpt["batch_generator"])
    return ckpt["progress"], ckpt["step"]


def restore_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping the learning rates of the current flags (a --resume may change them)."""
    lrs = [g["lr"] for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr


def reset_seed(args: Args, episode: int) -> int:
    """Online episode k starts from env.reset(seed=f(k)): a resumed run restarts exactly where the killed one was."""
    return (args.seed * 1_000_003 + 7_919 * (episode + 1)) % 2**32


# ---------------------------------------------------------------------------------------------------------------
# Main: offline phase, then online phase
# ---------------------------------------------------------------------------------------------------------------
def main(argv: Optional[list] = None) -> None:
    args = peek_args(Args, argv)  # --help is answered below, showing the resolved defaults
    ckpt = None
    if args.resume:  # continue a killed run: its saved config, overridden by the flags given now (e.g. a longer budget)
        ckpt, args = load_checkpoint(args, argv)
    else:  # the presets of --env on --device as defaults; flags given now win; `--env X --help` shows X's values
        args = cli_with_presets(Args, argv, preset_values)
    task = get_task(args.env)
    device = resolve_device(args.device)
    args = finish_args(args)  # also checks every flag's range
    if args.eval_only and ckpt is None:
        raise UserError("--eval-only evaluates a checkpoint: give the run with --resume DIR")
    if args.edis and not args.eval_only and args.online_steps > 0 and args.edis_min_online + 1 >= args.online_steps:
        print(f"warning: no EDIS retrain will happen (the first needs --edis-min-online {args.edis_min_online} online "
              f"steps, and --online-steps is {args.online_steps}): this run is plain fine-tuning. Lower "
              f"--edis-retrain-every / --edis-min-online, or raise --online-steps.", file=sys.stderr)
    exp_name = os.path.basename(__file__)[: -len(".py")]
    run_name = f"{task.name}__{exp_name}__{args.seed}__{int(time.time())}"
    out_dir = args.output_dir or os.path.join("runs", run_name)
    resuming_in_place = ckpt is not None and os.path.abspath(out_dir) == os.path.abspath(
        os.path.dirname(find_checkpoint(args.resume)))
    check_output_dir(out_dir, resuming=resuming_in_place, overwrite=args.overwrite)
    print(f"{exp_name} on {task.name}, device {device}; flags after presets (also in config.json):\n"
          f"{config_table(dataclasses.asdict(args))}")

    # TRY NOT TO MODIFY: seeding
    seed_everything(args.seed, args.torch_deterministic)
    gen = torch.Generator(device=device)  # the stream of batch indices and diffusion noise
    gen.manual_seed(args.seed)

    # BOILERPLATE: data -> device buffers (states normalised, rewards transformed)
    data = load_offline_data(task, dataset_path=args.dataset_path)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    if ckpt is None:
        obs_mean = data.observations.mean(0) if args.normalize_states else np.zeros(obs_dim, np.float32)
        obs_std = data.observations.std(0) + 1e-3 if args.normalize_states else np.ones(obs_dim, np.float32)
        r_scale, r_bias = reward_transform(data, args)
        norm = {"obs_mean": obs_mean.astype(np.float32), "obs_std": obs_std.astype(np.float32),
                "reward_scale": r_scale, "reward_bias": r_bias}
    else:
        norm = {k: v.numpy() if v.dim() else float(v) for k, v in ckpt["normalization"].items()}
    norm_obs = lambda o: (o - norm["obs_mean"]) / norm["obs_std"]  # noqa: E731
    norm_rew = lambda r: r * norm["reward_scale"] + norm["reward_bias"]  # noqa: E731
    rewards = norm_rew(data.rewards)
    rows = {"observations": norm_obs(data.observations), "actions": data.actions, "rewards": rewards,
            "next_observations": norm_obs(data.next_observations), "terminals": data.terminals}
    # >>> algo: Cal-QL's rows carry their Monte-Carlo return-to-go, the reference value of the calibration (Eq. 6)
    fail = float(np.float32(args.reward_bias)) if args.is_sparse_reward else None  # a raw reward of 0, transformed
    rows["mc_returns"] = mc_returns(rewards, data.episode_ends, args.gamma, fail)
    # <<< algo
    offline = ReplayBuffer(obs_dim, act_dim, len(data), device, extra=BUFFER_EXTRA)
    offline.add_batch(rows)
    online = ReplayBuffer(obs_dim, act_dim, max(args.online_steps, 1), device, extra=BUFFER_EXTRA)

    env = make_env(task, seed=args.seed)
    max_action = float(env.action_space.high[0])
    agent = Agent(obs_dim, act_dim, args, max_action).to(device)
    opts = make_optimizers(agent, args)
    edis = new_edis_state(obs_dim, act_dim, args, device)
    progress = {"offline_score": None, "evals": [], "episodes": 0, "train_successes": [], "updates": 0,
                "episode_scores": []}  # (step, normalized score) of each online training episode
    start_step = 0
    if ckpt is not None:
        progress, start_step = restore_checkpoint(ckpt, args, agent, opts, online, edis, gen)
    make_output_dir(out_dir)  # only now: a run that fails on its flags or data leaves no folder behind

    def policy_eval(o: np.ndarray) -> np.ndarray:
        agent.actor.eval()
        a = agent.actor.act(torch.as_tensor(norm_obs(o), dtype=torch.float32, device=device)[None])
        agent.actor.train()
        return a[0].cpu().numpy()

    def videos(step: int, kind: str = "step") -> Optional[str]:
        return os.path.join(out_dir, "videos", f"{kind}{step}") if args.capture_video else None

    if args.eval_only:  # BOILERPLATE: evaluate a checkpoint (e.g. --resume run --eval-only --capture-video)
        res = {"step": start_step, **evaluate(task, policy_eval, args.eval_episodes, args.seed + 10_000,
                                              video_dir=videos(start_step, "eval-only-step"))}
        atomic_write_bytes(os.path.join(out_dir, "eval.json"), json.dumps(res, indent=2).encode())
        print(f"{task.name}: normalized score {res['eval/normalized_score']:.1f} (success "
              f"{res['eval/success_rate']:.2f}) over {args.eval_episodes} episodes at step {start_step}; "
              f"{out_dir}/eval.json")
        return
    atomic_write_bytes(os.path.join(out_dir, "config.json"), json.dumps(  # the effective config, also on resume
        {"args": dataclasses.asdict(args), "task": dataclasses.asdict(task), "device": str(device)}, indent=2,
        default=str).encode())
    if ckpt is not None:
        print(f"resumed {out_dir} at step {start_step}")

    # >>> algo: the gradient step
    update = torch.compile(calql_update) if args.compile else calql_update
    # <<< algo
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)  # noqa: E731
    logger = Logger(out_dir, args, run_name)

    def run_eval(step: int) -> dict:
        res = evaluate(task, policy_eval, args.eval_episodes, seed=args.seed + 10_000, video_dir=videos(step))
        logger.scalars(res, step)
        progress["evals"].append({"step": step, **res})
        return res

    def checkpoint(step: int) -> None:
        logger.flush_pending(step)  # stops a diverged run before its checkpoint could overwrite the last good one
        save_checkpoint(os.path.join(out_dir, CHECKPOINT), args, step, agent, opts, online, edis, norm, progress, gen)

    total = args.offline_steps + args.online_steps
    bar = tqdm(total=total, initial=start_step, desc=task.name, unit="step", dynamic_ncols=True, mininterval=2.0)
    t_start, t_sps, n_sps = time.time(), time.time(), 0
    print(f"{task.name}: {len(data)} offline transitions ({data.source}); logging to {out_dir}")

    # ALGO LOGIC: offline phase: the base algorithm on the offline dataset
    for step in range(start_step, args.offline_steps):
        batch = offline.sample(args.batch_size, gen)
        with amp():
            # >>> algo: one Cal-QL update (Alg. 1): calibrated CQL (Eq. 6) with the offline CQL weight
            metrics = update(agent, opts, batch, args, args.calibration, args.cql_alpha)
            # <<< algo
        logger.accumulate(metrics, step + 1)
        progress["updates"] += 1
        n_sps += 1
        bar.update(1)
        if (step + 1) % args.log_every == 0:
            logger.flush_pending(step + 1)
            logger.scalars({"charts/SPS": n_sps / max(time.time() - t_sps, 1e-9)}, step + 1)
            t_sps, n_sps = time.time(), 0
        if (step + 1) % args.eval_every == 0 and step + 1 < args.offline_steps:
            bar.set_postfix(score=f"{run_eval(step + 1)['eval/normalized_score']:.1f}")
        if (step + 1) % args.checkpoint_every == 0:
            checkpoint(step + 1)
    if start_step <= args.offline_steps and progress["offline_score"] is None:
        res = run_eval(args.offline_steps)
        progress["offline_score"] = res["eval/normalized_score"]
        tqdm.write(f"offline phase done: normalized score {res['eval/normalized_score']:.1f} "
                   f"(success {res['eval/success_rate']:.2f})")
        checkpoint(args.offline_steps)

    # ALGO LOGIC: online phase: act, store, update (EDIS batches once synthetic data exists). Online checkpoints wait
    # for the end of the episode in progress, so a resumed run starts the same next episode as an uninterrupted one.
    obs, _ = env.reset(seed=reset_seed(args, progress["episodes"]))
    ep_ret, ep_success, ep_start, checkpoint_due = 0.0, False, online.size, False
    for step in range(max(start_step, args.offline_steps), total):
        t = step - args.offline_steps  # online env steps done so far
        with torch.no_grad():
            s = torch.as_tensor(norm_obs(obs), dtype=torch.float32, device=device)[None]
            action = agent.actor.sample(s)[0].cpu().numpy()
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
            ep_stats = {"charts/episodic_return": ep_ret, "charts/episodic_length": online.size - ep_start,
                        "charts/episodic_normalized_score": float(normalized_score(task, ep_ret))}
            progress.setdefault("episode_scores", []).append([step + 1, ep_stats["charts/episodic_normalized_score"]])
            if task.goal_reaching:  # CORL's regret: 1 - mean success over the online training episodes
                ep_stats["charts/regret"] = 1.0 - float(np.mean(progress["train_successes"]))
            logger.scalars(ep_stats, step + 1)
            # >>> algo: with --calibration-online the finished episode's rows get their Monte-Carlo returns
            online_mc_returns(online, torch.arange(ep_start, online.size, device=device), args, norm)
            # <<< algo
            obs, _ = env.reset(seed=reset_seed(args, progress["episodes"]))
            ep_ret, ep_success, ep_start = 0.0, False, online.size
        # EDIS: retrain every edis_retrain_every online steps, first once the online buffer is large enough (never on
        # the last step: no update would use the samples)
        if args.edis and online.size >= args.edis_min_online and t + 1 < args.online_steps and (
                edis.last_retrain_step < 0 or t + 1 - edis.last_retrain_step >= args.edis_retrain_every):
            tqdm.write(f"EDIS retrain {edis.retrains + 1} at online step {t + 1} ...")
            with amp():
                metrics = edis_retrain(edis, offline, online, lambda o: agent.actor.sample(o), args, gen)
            edis.last_retrain_step = t + 1
            logger.scalars(check_finite({k: float(v) for k, v in metrics.items()}, f"step {step + 1}"), step + 1)
        for _ in range(args.utd):
            # EDIS batches: --edis-ratio synthetic (+ --edis-offline-frac offline, 0 in the paper) + the rest online
            if args.edis and edis.synthetic is not None:
                n_syn = int(round(args.batch_size * args.edis_ratio))
                n_off = int(round(args.batch_size * args.edis_offline_frac))
                n_on = args.batch_size - n_syn - n_off
                batch = concat_batches(edis.synthetic.sample(n_syn, gen), online.sample(n_on, gen))
                if n_off:  # (after the online rows: Cal-QL's --cql-rows takes the rows after the synthetic ones)
                    batch = concat_batches(batch, offline.sample(n_off, gen))
            else:  # no EDIS, or before its first retrain: the base algorithm's own fine-tuning batches
                # >>> algo: mixing_ratio offline + the rest online (Cal-QL Sec. 6, CORL's fine-tuning)
                n_off = int(args.batch_size * args.mixing_ratio)
                batch = concat_batches(offline.sample(n_off, gen), online.sample(args.batch_size - n_off, gen))
                # <<< algo
            with amp():
                # >>> algo: Cal-QL update with the online CQL weight; calibration only with --calibration-online (CORL)
                # (with EDIS, --cql-rows may give the CQL regulariser other rows than the batch's: cql_rows_batch)
                cql_batch = cql_rows_batch(batch, n_syn, n_off, offline, args, gen) if (
                    args.edis and edis.synthetic is not None) else None
                metrics = update(agent, opts, batch, args, args.calibration and args.calibration_online,
                                 args.cql_alpha_online, cql_batch)
                # <<< algo
            logger.accumulate(metrics, step + 1)
            progress["updates"] += 1
            n_sps += 1
        bar.update(1)
        if (step + 1) % args.log_every == 0:
            logger.flush_pending(step + 1)
            logger.scalars({"charts/SPS": n_sps / max(time.time() - t_sps, 1e-9),
                            "charts/synthetic_fraction": args.edis_ratio if edis.synthetic is not None and args.edis
                            else 0.0}, step + 1)
            t_sps, n_sps = time.time(), 0
        if (step + 1) % args.eval_every == 0 and step + 1 < total:
            bar.set_postfix(score=f"{run_eval(step + 1)['eval/normalized_score']:.1f}")
        checkpoint_due |= (step + 1) % args.checkpoint_every == 0
        if checkpoint_due and episode_over:
            checkpoint(step + 1)
            checkpoint_due = False
    bar.close()

    last = progress["evals"][-1] if progress["evals"] else None
    final = last if last is not None and last["step"] == total else run_eval(total)
    checkpoint(total)
    logger.flush_pending(total)
    summary = {
        "env": task.name, "seed": args.seed, "edis": args.edis,
        "offline_normalized_score": progress["offline_score"],
        "final_normalized_score": final["eval/normalized_score"],
        "final_success_rate": final["eval/success_rate"],
        "regret": (1.0 - float(np.mean(progress["train_successes"]))
                   if task.goal_reaching and progress["train_successes"] else None),
        "updates": progress["updates"], "online_env_steps": online.size, "online_episodes": progress["episodes"],
        "edis_retrains": edis.retrains, "wall_time_s": time.time() - t_start, "output_dir": out_dir,
    }
    atomic_write_bytes(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    curves = {"evaluation": ([e["step"] for e in progress["evals"]],
                             [e["eval/normalized_score"] for e in progress["evals"]], "D4RL normalized score")}
    if progress.get("episode_scores"):
        curves["online training episodes"] = (*zip(*progress["episode_scores"]), "D4RL normalized score")
    save_curves_png(os.path.join(out_dir, "learning_curve.png"), curves,
                    "step (offline updates, then online env steps)", f"{task.name}: {exp_name}, seed {args.seed}",
                    vline=(args.offline_steps, "offline -> online"))
    logger.close()
    env.close()
    print(f"{task.name}: normalized score {summary['offline_normalized_score']:.1f} (offline) -> "
          f"{summary['final_normalized_score']:.1f} (after {online.size} online steps); {out_dir}/summary.json")


# <<< shared:main


if __name__ == "__main__":
    run_cli(main)
