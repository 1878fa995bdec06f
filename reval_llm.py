# reval_llm.py: ReVal, off-policy value-based RL for LLMs with a replay buffer. Docs: docs/reval_llm.md
#
# ReVal: Wang et al. "Off-Policy Value-Based Reinforcement Learning for Large Language Models." arXiv 2603.23355.
#   Logits are soft Q-values: Q_theta(s, a) = logits, V_theta(s) = logsumexp(logits), pi_theta = softmax(Q_theta).
#   Loss (Eq. 2), per trajectory: ( V_theta(s_1) - V_ref(s_1) + log pi_theta(tau) - r / beta - log pi_ref(tau) )^2,
#   the telescoped sum of per-token soft-Bellman residuals whose target mixes the reference model's stepwise signal
#   Q_ref(s_h, a_h) - V_ref(s_{h+1}) with the verifier's outcome reward r / beta (Sec. 4.2).
#   A FIFO replay buffer of M trajectories is reused: K updates per generation round (Algorithm 1, Eq. 3).
#
# Layout (identical in grpo_llm.py, so `diff grpo_llm.py reval_llm.py` shows only the algorithm):
#   Args -> model/data setup -> rollouts -> rewards -> ALGO LOGIC: loss -> evaluation -> checkpoints -> main loop.
# Blocks between `# >>> shared:NAME` and `# <<< shared:NAME` must stay textually identical in both LLM scripts.
#
# Scale beyond one device:  torchrun --nproc_per_node 8 reval_llm.py --preset paper-7b
# (each rank generates its share of the prompts; weights, gradients and AdamW state are sharded with FSDP2, or
# replicated with DDP for --fsdp False; rank 0 logs and saves). fp32 master weights, bf16 compute with --bf16.
# Before renting GPUs: --plan-gpus 8 prints the memory each GPU needs (utils/llm_memory.py).
# Copying this file into another project: it needs utils/__init__.py, utils/common.py, utils/llm_task.py,
# utils/llm_dist.py, utils/llm_memory.py, utils/llm_rollout.py (the vLLM engine) and utils/llm_run.py (flags, run
# folder, checkpoint files) beside it.
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from utils.common import (
    Diverged,
    Logger,
    UserError,
    check_finite,
    make_output_dir,
    run_cli,
    seed_everything,
    set_rng_state,
)
from utils.llm_dist import (
    all_finite,
    all_reduce_sum,
    as_float,
    gathered,
    load_optimizer_state,
    precision,
    prepare_model,
    setup_distributed,
    unwrap,
)
from utils.llm_memory import memory_plan_text
from utils.llm_rollout import engine_batch, make_engine, policy_weights, request_seed
from utils.llm_run import (
    accuracy_text,
    already_finished,
    finish_run,
    model_defaults,
    parse_flags,
    resolve_hardware,
    save_checkpoint,
    start_run,
    write_json,
)
from utils.llm_task import (
    BUILTIN,
    QWEN_MATH_SYSTEM,
    ensure_builtin_model,
    format_prompt,
    has_format,
    load_model,
    load_task_prompts,
    math_rewards,
)


# >>> shared:args_common
@dataclasses.dataclass
class Args:
    # --- run -----------------------------------------------------------------------------------------------------
    # 'builtin': a 1M-parameter Qwen2 warmed up on the built-in task, built once (about 4 minutes on 2 CPU cores)
    # and cached in ~/.cache/reference-rl ($REFERENCE_RL_CACHE).
    model: str = BUILTIN
    """a Hugging Face model id or local folder (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B), or 'builtin'"""
    dataset: str = BUILTIN
    """'builtin' (GSM8K-style word problems), a .jsonl/.json/.parquet file, or a Hub id (e.g. openai/gsm8k)"""
    dataset_config: Optional[str] = None
    """Hub dataset configuration name"""
    train_split: str = "train"
    """split used for training prompts"""
    eval_dataset: Optional[str] = None
    """dataset for evaluation (default: --dataset)"""
    eval_split: str = "test"
    """split used for evaluation"""
    question_field: str = "question"
    """field holding the problem text"""
    answer_field: str = "answer"
    """field holding the gold answer (GSM8K's '#### 72' suffix is recognised)"""
    # plain: "Question: ...\\nAnswer:" (the built-in model's format). r1 (ReVal App. F): "<question> Let's think step
    # by step and output the final answer within \\boxed{}." through the tokenizer's chat template.
    prompt_template: Literal["auto", "plain", "r1"] = "auto"
    """plain (the built-in model's format) or r1 (ReVal App. F, chat template); auto: plain for builtin, else r1"""
    qwen_math_system: bool = False
    """add the Qwen2.5-Math system prompt (ReVal App. F) before the r1 user turn"""
    seed: int = 1
    """seed of python, numpy, torch and the prompt order"""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda; under torchrun each rank takes cuda:<local rank>"""
    bf16: Optional[bool] = None
    """--bf16 / --no-bf16: bf16 compute over fp32 master weights and AdamW state (default: on for bf16 GPUs)"""
    fsdp: Optional[bool] = None
    """--fsdp / --no-fsdp: shard weights, grads and AdamW state over ranks (FSDP2; default: torchrun, not builtin)"""
    gradient_checkpointing: bool = False
    """keep only each decoder layer's input for the backward and recompute the rest (less memory, ~1/3 more time)"""
    plan_gpus: int = 0
    """print the per-GPU memory plan of this run on N GPUs (model built on the meta device) and exit; 0: train"""
    output_dir: Optional[str] = None
    """TensorBoard logs, config.json, checkpoint/ and summary.json (default runs/<model>__<exp>__<seed>__<time>)"""
    resume: Optional[str] = None
    """the output dir of a stopped run: continue it (flags given now override the saved ones, e.g. --total-rounds)"""
    overwrite: bool = False
    """start afresh in an --output-dir that holds an earlier run, deleting its files (otherwise refused)"""
    allow_eval_overlap: bool = False
    """train on prompts that are also evaluation prompts (by default they are removed from the training set)"""
    track: bool = False
    """also log to Weights & Biases (imported only then)"""
    wandb_project_name: str = "reference-rl"
    """W&B project (with --track)"""
    wandb_entity: Optional[str] = None
    """W&B entity (with --track)"""
    # --- rollouts ------------------------------------------------------------------------------------------------
    total_rounds: int = 200
    """generation rounds (each: sample, score, update)"""
    prompts_per_round: int = 16
    """prompts per round, over all ranks (ReVal paper: 128)"""
    group_size: int = 8
    """completions sampled per prompt, N or G (ReVal paper: 8)"""
    max_new_tokens: int = 48
    """completion length limit (ReVal paper: 7168 for DeepSeek-R1-Distill-1.5B)"""
    max_prompt_tokens: int = 1024
    """prompts longer than this are truncated from the left"""
    temperature: float = 1.0
    """sampling temperature (top_k=0, top_p=1: the samples come from the policy itself)"""
    rollout_engine: Literal["hf", "vllm"] = "hf"
    """hf: transformers generate; vllm: a colocated vLLM engine per rank, weights synced after every update"""
    vllm_gpu_memory_utilization: float = 0.3
    """share of each GPU the vLLM engine reserves for its weights and KV cache (it sleeps during the update)"""
    reward_timeout: float = 1.0
    """time limit in seconds of one math-verify check; it runs in a worker process that is killed at the limit (0)"""
    # --- optimisation --------------------------------------------------------------------------------------------
    learning_rate: float = 5e-5
    """AdamW learning rate (5e-5 for the built-in model, else 1e-6 as the ReVal paper; --help shows the resolved one)"""
    weight_decay: float = 0.01
    """AdamW weight decay (verl default)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    micro_batch_size: int = 32
    """sequences per forward/backward (gradient accumulation inside one update)"""
    # --- evaluation, logging, checkpoints ------------------------------------------------------------------------
    eval_every: int = 25
    """evaluate every this many rounds (and at the start and the end)"""
    eval_prompts: int = 256
    """held-out prompts per evaluation"""
    eval_samples: int = 4
    """k of mean@k sampled accuracy (0: greedy only)"""
    eval_batch_size: int = 128
    """prompts per generate call during evaluation"""
    checkpoint_every: int = 50
    """save checkpoint/ every this many rounds (atomically), and at the end"""
    eval_only: bool = False
    """with --resume: evaluate the checkpoint's model (greedy, mean@k sampled accuracy) into eval.json; no training"""
# <<< shared:args_common
    # --- ReVal -------------------------------------------------------------------------------------------------
    # The paper's settings (Sec. 5.1, App. A): model, DeepScaleR data, 128 prompts x 8, lr 1e-6, lengths, beta, M, K,
    # reward design and resets (PRESETS below).
    preset: Literal["none", "paper-1.5b", "paper-7b"] = "none"
    """the paper's settings (ReVal Sec. 5.1, App. A); flags given on the command line still override them"""
    # Paper: 0.002 for DeepSeek-R1-Distill-1.5B (~5K-token answers), 0.02 for Qwen2.5-Math-7B (~600 tokens);
    # default 0.1 for the built-in model's ~30-token answers.
    beta: float = 0.1
    """reward scale: the verifier reward enters Eq. 2 as r / beta (paper 0.002 for 1.5B, 0.02 for 7B)"""
    updates_per_round: int = 2
    """K: one update on the fresh rollouts, then K - 1 on uniform samples of the same size from the replay buffer"""
    buffer_size: Optional[int] = None
    """M: FIFO replay capacity in trajectories over all ranks (paper 5120; default 5 rounds of rollouts)"""
    # group_mean is the paper's best (Sec. 5.5.4); with one rollout per prompt it keeps the raw reward.
    reward_mode: Literal["binary", "pm1", "group_mean"] = "group_mean"
    """binary: r in {0, 1}; pm1: 2r - 1; group_mean: r - its prompt group's mean reward"""
    v1_grad: bool = True
    """let the gradient flow through V_theta(s_1) (Eq. 2 taken literally; Eq. 4 omits that term): see the docs"""
    ref_reset_every: int = 0
    """every this many rounds set pi_ref <- pi_theta (paper: 200 best for Qwen2.5-Math-7B); 0 = never"""
    ref_reset_mode: Literal["recompute", "flush"] = "recompute"
    """after a reset: recompute the buffer's cached log pi_ref(tau) and V_ref(s_1), or empty the buffer"""


# >>> shared:rollout
# ---------------------------------------------------------------------------------------------------------------
# Rollouts: sampling, training-layout log-probs
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, tok, prompts: list, n: int, args: Args, greedy: bool = False, engine=None,
             seeds: Optional[list] = None) -> dict:
    """n completions per prompt with HF generate (KV cache, left padding), or the vLLM ``engine`` (one seed per
    prompt). Sampling passes top_k=0 and top_p=1.0 explicitly: transformers 5 otherwise applies top_k=50, and the
    samples would not come from the policy."""
    if engine is not None:  # utils/llm_rollout.py; the same batch layout, plus the engine's log-probs
        return engine_batch(engine, tok, prompts, n, args.max_prompt_tokens, args.max_new_tokens, args.temperature,
                            greedy, seeds, model.device)
    enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=args.max_prompt_tokens,
              add_special_tokens=False).to(model.device)
    ids, mask = enc.input_ids.repeat_interleave(n, 0), enc.attention_mask.repeat_interleave(n, 0)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    # FSDP: the full weights, once per call, so no step communicates and ranks may stop at different lengths
    # (synced_gpus=False: transformers would otherwise keep every rank stepping until all are done); bf16 with --bf16
    with gathered(model), precision(model, args.bf16):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, synced_gpus=False, **kw)
    completion = out[:, ids.shape[1]:]
    # completion mask: every token up to and including the first EOS (later positions are padding)
    is_eos = completion == tok.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    cmask = (~after_eos).long()
    if completion.shape[1] == 0:
        cmask = torch.zeros_like(completion)
    texts = tok.batch_decode(completion.masked_fill(cmask == 0, tok.pad_token_id), skip_special_tokens=True)
    return {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": completion, "completion_mask": cmask,
            "texts": texts, "truncated": ~is_eos.any(1)}


def sequence_logits(model, batch: dict) -> torch.Tensor:
    """Logits that predict each completion token, in training layout: prompt + completion, explicit position_ids
    so left padding does not shift positions. Returns [B, T, V]; position t predicts completion token t."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    P = batch["prompt_ids"].shape[1]
    return logits[:, P - 1:-1].float()  # fp32 for the log-softmax and the loss


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token | prefix) of the sampling distribution softmax(logits / temperature): [B, T]."""
    return torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprob_gap(model, batch: dict, args: Args) -> torch.Tensor:
    """Sum over completion tokens of |log p_engine - log p_trainer| (the trainer recomputes; the losses use its
    values): how far the engine's samples are from the policy being trained."""
    with torch.no_grad():
        return sum(((token_logprobs(sequence_logits(model, mb), mb["completion_ids"], args.temperature)
                     - mb["engine_logp"]).abs() * mb["completion_mask"]).sum()
                   for mb in micro_batches(batch, args.micro_batch_size))


def micro_batches(batch: dict, size: int):
    n = batch["completion_ids"].shape[0]
    for s in range(0, n, size):
        yield {k: v[s:s + size] if torch.is_tensor(v) else v for k, v in batch.items()}


def score(texts: list, golds: list, args: Args) -> tuple:
    """0/1 verifier rewards and the format rate."""
    rewards = math_rewards(texts, golds, args.reward_timeout)  # checked in parallel worker processes
    return rewards, float(np.mean([has_format(t) for t in texts])) if texts else 0.0
# <<< shared:rollout


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: ReVal (arXiv 2603.23355, Eq. 2, Algorithm 1)
# ---------------------------------------------------------------------------------------------------------------
# --preset NAME: flags given on the command line still win (utils/common.py: cli_with_presets). Beyond the paper's
# settings, gradient checkpointing and 4 evaluation prompts per generate call make both fit 8 x 80 GB GPUs, and
# rollouts go through a colocated vLLM engine (as verl, the paper's stack) with the GPU share its weights and one
# round's KV cache need (--plan-gpus 8 prints the plan; docs/llm_scale.md).
PRESETS = {
    "none": {},
    "paper-1.5b": dict(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
                       dataset="agentica-org/DeepScaleR-Preview-Dataset",
                       question_field="problem", answer_field="answer", eval_dataset="HuggingFaceH4/MATH-500",
                       eval_split="test", prompt_template="r1", prompts_per_round=128, group_size=8,
                       max_new_tokens=7168, max_prompt_tokens=1024, learning_rate=1e-6, beta=0.002, buffer_size=5120,
                       updates_per_round=2, total_rounds=650, eval_every=10, eval_samples=16, eval_prompts=100,
                       reward_mode="binary", ref_reset_every=0, micro_batch_size=1, gradient_checkpointing=True,
                       eval_batch_size=4, rollout_engine="vllm", vllm_gpu_memory_utilization=0.5),
    "paper-7b": dict(model="Qwen/Qwen2.5-Math-7B", dataset="agentica-org/DeepScaleR-Preview-Dataset",
                     question_field="problem", answer_field="answer", eval_dataset="HuggingFaceH4/MATH-500",
                     eval_split="test", prompt_template="r1", qwen_math_system=True, prompts_per_round=128,
                     group_size=8, max_new_tokens=3072, max_prompt_tokens=1024, learning_rate=1e-6, beta=0.02,
                     buffer_size=5120, updates_per_round=2, total_rounds=650, eval_every=10, eval_samples=16,
                     eval_prompts=100, reward_mode="group_mean", ref_reset_every=200, micro_batch_size=2,
                     gradient_checkpointing=True, eval_batch_size=4, rollout_engine="vllm",
                     vllm_gpu_memory_utilization=0.65),
}


def shaped_rewards(rewards: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """The reward r that enters Eq. 2 as r / beta (Sec. 5.5.4): 0/1, +-1, or centred on its prompt group's mean
    (no std division, as Dr. GRPO). A singleton group keeps its raw reward (its own mean would make it 0)."""
    if mode == "pm1":
        return 2.0 * rewards - 1.0
    if mode == "group_mean" and group_size > 1:
        g = rewards.view(-1, group_size)
        return (g - g.mean(1, keepdim=True)).view(-1)
    return rewards


def reval_residual(v_theta, v_ref, logp_theta, logp_ref, reward, beta: float) -> torch.Tensor:
    """Eq. 2, inside the square: V_theta(s_1) - V_ref(s_1) + log pi_theta(tau) - r / beta - log pi_ref(tau).
    Zero for all trajectories iff pi_theta(tau) = pi_ref(tau) exp(r / beta) / Z and V_theta - V_ref = log Z."""
    return (v_theta - v_ref) + (logp_theta - logp_ref) - reward / beta


def trajectory_terms(model, mb: dict) -> tuple:
    """Logit-as-Q terms of a micro-batch: V(s_1) = logsumexp of the logits at the last prompt position (the position
    that predicts the first response token), log pi(tau) = sum over response tokens (EOS included, padding masked)
    of log softmax(Q)(a_h), and the full log-softmax (for the entropy). Softmax temperature 1 (Sec. 4.1)."""
    logits = sequence_logits(model, mb)  # [B, T, V] fp32 raw logits = Q(s_h, .)
    v1 = torch.logsumexp(logits[:, 0], -1)
    log_probs = torch.log_softmax(logits, -1)
    tok = log_probs.gather(-1, mb["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return v1, (tok * mb["completion_mask"]).sum(1), log_probs


@torch.no_grad()
def reference_terms(ref_model, batch: dict, args: Args) -> tuple:
    """Cached per trajectory: V_ref(s_1) and log pi_ref(tau), valid until the next reference reset."""
    v, lp = [], []
    for mb in micro_batches(batch, args.micro_batch_size):
        v1, logp, _ = trajectory_terms(ref_model, mb)
        v.append(v1)
        lp.append(logp)
    return torch.cat(v), torch.cat(lp)


def loss_terms(model, mb: dict, args: Args, normalizer: torch.Tensor) -> tuple:
    """The micro-batch's share of Eq. 2, mean over trajectories: sum of squared residuals / all trajectories."""
    v1, logp, log_probs = trajectory_terms(model, mb)
    if not args.v1_grad:
        v1 = v1.detach()
    delta = reval_residual(v1, mb["ref_v1"], logp, mb["ref_logp"], mb["reward"], args.beta)  # fp32
    loss = delta.pow(2).sum() / normalizer
    with torch.no_grad():
        mask = mb["completion_mask"].float()
        lp = log_probs.detach()
        entropy = (-(lp.exp() * lp).sum(-1) * mask).sum()
        n = torch.tensor(float(delta.shape[0]), device=delta.device)
        sums = torch.stack([delta.abs().sum(), (logp - mb["ref_logp"]).detach().sum(), entropy, n, n, mask.sum()])
    return loss, sums


# train/kl: mean over the batch's trajectories of log pi_theta(tau) / pi_ref(tau) (an on-policy estimate of the
# sequence KL for fresh rollouts); train/residual_abs: mean |residual of Eq. 2|
ALGO_METRICS = ("train/residual_abs", "train/kl", "train/entropy")


# --- the FIFO replay buffer (Sec. 4.3): plain dicts and lists, so it goes into trainer_state.pt as it is ----------
def new_buffer(capacity: int) -> dict:
    return {"items": [], "capacity": int(capacity), "added": 0, "evicted_uses": []}


def buffer_add(buf: dict, items: list, round_idx: int) -> None:
    """Append trajectories; evict the oldest beyond capacity (first in, first out), recording each one's uses."""
    for it in items:
        buf["items"].append(dict(it, round=round_idx, uses=1))  # the on-policy update is its first use
        buf["added"] += 1
    while len(buf["items"]) > buf["capacity"]:
        buf["evicted_uses"].append(buf["items"].pop(0)["uses"])


def buffer_sample(buf: dict, n: int, rng: random.Random) -> list:
    """n trajectories uniformly, without replacement within one draw (no priorities, no importance weights)."""
    picked = rng.sample(range(len(buf["items"])), min(n, len(buf["items"])))
    for i in picked:
        buf["items"][i]["uses"] += 1
    return [buf["items"][i] for i in picked]


def split_items(batch: dict) -> list:
    """One CPU dict per trajectory: unpadded prompt and response tokens, reward and cached reference terms."""
    items = []
    for i in range(batch["completion_ids"].shape[0]):
        pm, cm = batch["prompt_mask"][i].bool(), batch["completion_mask"][i].bool()
        items.append({"prompt": batch["prompt_ids"][i][pm].cpu(), "completion": batch["completion_ids"][i][cm].cpu(),
                      "reward": float(batch["reward"][i]), "ref_v1": float(batch["ref_v1"][i]),
                      "ref_logp": float(batch["ref_logp"][i])})
    return items


def collate(items: list, pad_id: int, device: torch.device) -> dict:
    """Re-pad trajectories: prompts on the left, responses on the right (as generate lays them out)."""
    P = max(len(it["prompt"]) for it in items)
    T = max(max(len(it["completion"]) for it in items), 1)
    B = len(items)
    out = {"prompt_ids": torch.full((B, P), pad_id, dtype=torch.long),
           "prompt_mask": torch.zeros(B, P, dtype=torch.long),
           "completion_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "completion_mask": torch.zeros(B, T, dtype=torch.long)}
    for i, it in enumerate(items):
        p, c = it["prompt"], it["completion"]
        out["prompt_ids"][i, P - len(p):], out["prompt_mask"][i, P - len(p):] = p, 1
        out["completion_ids"][i, :len(c)], out["completion_mask"][i, :len(c)] = c, 1
    out = {k: v.to(device) for k, v in out.items()}
    for k in ("reward", "ref_v1", "ref_logp"):
        out[k] = torch.tensor([it[k] for it in items], dtype=torch.float32, device=device)
    return out


# >>> shared:train
def optimizer_step(model, opt, batch: dict, args: Args, world: int, amp) -> dict:
    """One update on the round's batch: gradient accumulation over micro-batches (DDP all-reduces on the last one;
    FSDP reduce-scatters each), loss normalised over the whole (all-rank) batch, gradient clipping, AdamW step."""
    normalizer = all_reduce_sum(algo_normalizer(batch, args))
    opt.zero_grad(set_to_none=True)
    mbs = list(micro_batches(batch, args.micro_batch_size))
    sums, total = None, torch.zeros((), device=normalizer.device)
    for i, mb in enumerate(mbs):
        sync = i == len(mbs) - 1 or not hasattr(model, "no_sync")
        ctx = model.no_sync() if not sync else contextlib.nullcontext()
        with ctx, amp():
            loss, s = loss_terms(model, mb, args, normalizer)
            (loss * world).backward()  # DDP and FSDP average gradients over ranks; the loss is a global sum share
        sums = s if sums is None else sums + s
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)  # the gradients' memory is free again for generation
    # metric i = (sum of its values) / (its count), summed over micro-batches and ranks; the loss over ranks too
    sums = all_reduce_sum(torch.cat([sums, total.view(1)]))
    n = len(ALGO_METRICS)
    out = {k: float(sums[i] / sums[n + i].clamp(min=1)) for i, k in enumerate(ALGO_METRICS)}
    out.update({"train/loss": float(sums[-1]), "train/grad_norm": as_float(grad_norm)})
    return out
# <<< shared:train


def algo_normalizer(batch: dict, args: Args) -> torch.Tensor:
    """Eq. 2 is a mean over trajectories: the denominator is the number of trajectories in the update batch."""
    return torch.tensor(float(batch["completion_ids"].shape[0]), device=batch["completion_ids"].device)


def reset_reference(model, ref_model, tok, state: dict, args: Args) -> None:
    """pi_ref <- pi_theta (Sec. 5.5.3); the buffer's cached reference terms are recomputed or the buffer flushed."""
    policy = unwrap(model)
    ref_model.load_state_dict(policy.state_dict())  # sharded alike under FSDP: each rank copies its own shards
    state["ref_resets"] += 1  # the checkpoint now saves the reference too (checkpoint/reference/)
    buf = state["buffer"]
    if args.ref_reset_mode == "flush":
        buf["items"].clear()
        return
    for s in range(0, len(buf["items"]), args.micro_batch_size):
        chunk = buf["items"][s:s + args.micro_batch_size]
        v1, lp = reference_terms(ref_model, collate(chunk, tok.pad_token_id, policy.device), args)
        for it, a, b in zip(chunk, v1.tolist(), lp.tolist()):
            it["ref_v1"], it["ref_logp"] = a, b


ALGO_RANGES = {"beta": "(0, inf)", "updates_per_round": "[1, inf)", "buffer_size": "[1, inf)",
               "ref_reset_every": "[0, inf)"}
ALGO_RESUME_MAY_CHANGE: set = set()  # ReVal flags a --resume may change beyond the shared ones: none


# >>> shared:eval
# ---------------------------------------------------------------------------------------------------------------
# Evaluation: greedy accuracy and mean@k sampled accuracy on held-out prompts (split over ranks)
# ---------------------------------------------------------------------------------------------------------------
def evaluate(model, tok, prompts: list, golds: list, args: Args, rank: int, world: int, engine=None) -> dict:
    """Greedy accuracy and mean@k sampled accuracy. Sampling uses its own seeded RNG, so an evaluation never changes
    the training run's random stream (a resumed run equals an uninterrupted one wherever evaluations fall)."""
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1_000_003 * (rank + 1))
        return _evaluate(model, tok, prompts, golds, args, rank, world, engine)


def _evaluate(model, tok, prompts: list, golds: list, args: Args, rank: int, world: int, engine) -> dict:
    model.eval()
    mine = list(range(rank, len(prompts), world))
    sums = torch.zeros(3, device=model.device)  # greedy correct, sampled correct, sampled count
    # FSDP: gathered once for all calls, as ranks may make different numbers of them (the engine needs no gather)
    with gathered(model) if engine is None else contextlib.nullcontext():
        for s in range(0, len(mine), args.eval_batch_size):
            idx = mine[s:s + args.eval_batch_size]
            p, g = [prompts[i] for i in idx], [golds[i] for i in idx]
            out = generate(model, tok, p, 1, args, greedy=True, engine=engine, seeds=[0] * len(p))
            sums[0] += sum(score(out["texts"], g, args)[0])
            if args.eval_samples > 0:  # the same seeds at every evaluation, as the HF path's forked RNG
                seeds = [request_seed(args.seed, 999_983, i) for i in idx]
                out = generate(model, tok, p, args.eval_samples, args, engine=engine, seeds=seeds)
                r, _ = score(out["texts"], [x for x in g for _ in range(args.eval_samples)], args)
                sums[1] += sum(r)
                sums[2] += len(r)
    sums = all_reduce_sum(sums)
    model.train()
    res = {"eval/accuracy": float(sums[0] / max(len(prompts), 1))}
    if args.eval_samples > 0:
        res["eval/accuracy_sampled"] = float(sums[1] / sums[2].clamp(min=1))
    return res
# <<< shared:eval


# >>> shared:main
def main(argv: Optional[list] = None) -> None:
    # >>> algo: the model's defaults, then the paper's settings with --preset (flags given now win)
    defaults = lambda a: {**model_defaults(a), **PRESETS[a.preset]}  # noqa: E731
    # <<< algo
    args, resume_dir, saved = parse_flags(Args, argv, defaults, ALGO_RESUME_MAY_CHANGE, ALGO_RANGES)
    if already_finished(args, resume_dir, saved):  # a finished run stays finished unless its budget is raised
        return
    # >>> algo: ReVal's derived default and its one requirement on sampling
    if args.buffer_size is None:  # M: five rounds of rollouts (the paper's 5,120 = 5 x 128 prompts x 8)
        args.buffer_size = 5 * args.prompts_per_round * args.group_size
    if args.temperature != 1.0:
        raise UserError("ReVal's behaviour policy is softmax(Q) itself: --temperature must be 1.0")
    # <<< algo
    # >>> algo: log pi_ref and V_ref are part of every residual (Eq. 2)
    use_ref = True
    # <<< algo
    if args.plan_gpus:  # BOILERPLATE: the memory plan of this configuration; nothing is loaded or trained
        print(memory_plan_text(args.model, args.plan_gpus, args.fsdp, args.bf16, args.gradient_checkpointing, use_ref,
                               args.micro_batch_size, args.max_prompt_tokens, args.max_new_tokens,
                               args.prompts_per_round * args.group_size,
                               min(args.eval_batch_size, -(-args.eval_prompts // args.plan_gpus))
                               * max(args.eval_samples, 1), args.rollout_engine, args.vllm_gpu_memory_utilization))
        return
    rank, world, device = setup_distributed(args.device)
    resolve_hardware(args, device, world, saved)  # bf16, FSDP and the prompt template by default; checks
    log = print if rank == 0 else (lambda *a, **k: None)
    exp_name, run_name, out_dir = start_run(__file__, args, rank, world, device, resume_dir, log)

    # TRY NOT TO MODIFY: seeding (same init on every rank; data and sampling streams differ per rank)
    seed_everything(args.seed)
    if device.type == "cpu" and world > 1:  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    # BOILERPLATE: data (checked before the model loads), model, optimizer
    train, evalset, overlap = load_task_prompts(
        args.dataset, args.eval_dataset, args.dataset_config, args.train_split, args.eval_split, args.question_field,
        args.answer_field, args.eval_prompts, args.prompts_per_round, args.allow_eval_overlap, log)
    if rank == 0 and args.model == BUILTIN:
        ensure_builtin_model(log=log)  # rank 0 builds it once; the others then load the cached copy
    if dist.is_initialized():
        dist.barrier()
    tok, model = load_model(resume_dir or args.model, log, resume_dir and args.resume)  # fp32 master weights
    system = QWEN_MATH_SYSTEM if args.qwen_math_system else None
    to_prompt = lambda q: format_prompt(tok, q, args.prompt_template, system)  # noqa: E731
    eval_prompts, eval_golds = [to_prompt(r["question"]) for r in evalset], [r["answer"] for r in evalset]
    ref_model = None
    if use_ref:  # frozen, computed exactly as the policy (same precision, same sharding): equal to it at the start
        ref_dir = resume_dir and os.path.join(resume_dir, "reference")  # after ReVal's resets: the checkpoint's
        _, ref_model = load_model(ref_dir if ref_dir and os.path.isdir(ref_dir) else args.model, log)
        ref_model = prepare_model(ref_model, device, world, args.fsdp, args.bf16, trainable=False)
    model = prepare_model(model, device, world, args.fsdp, args.bf16, True, args.gradient_checkpointing)
    policy = unwrap(model)  # DDP's module, else the model itself (an FSDP2 model is still the HF model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.99),
                            weight_decay=args.weight_decay)
    amp = lambda: precision(model, args.bf16)  # noqa: E731  bf16 autocast unless FSDP's policy casts already
    # --rollout-engine vllm: a colocated engine (utils/llm_rollout.py) starting from the weights just loaded
    engine = make_engine(args.rollout_engine, resume_dir or (ensure_builtin_model(log=log) if args.model == BUILTIN
                         else args.model), device, args.bf16, args.max_prompt_tokens + args.max_new_tokens,
                         args.vllm_gpu_memory_utilization, args.seed)
    state = {"round": 0, "generated": 0, "initial_eval": None, "evals": [], "wall_time_s": 0.0, "updates": 0}
    # >>> algo: the FIFO replay buffer of M trajectories (Sec. 4.3; per rank) and the reference-reset bookkeeping
    state.update(replay_updates=0, algo_rounds=0, ref_resets=0,
                 buffer=new_buffer(max(args.buffer_size // world, 1)))
    # <<< algo
    if saved is not None:
        load_optimizer_state(model, opt, saved["optimizer"])
        for g in opt.param_groups:  # the learning rate of the current flags (a --resume may change it)
            g["lr"] = args.learning_rate
        state.update(saved["ranks"][rank]["state"])  # this rank's own state and random streams
        set_rng_state(saved["ranks"][rank]["rng"])
    if rank == 0:  # only now: a run that fails on its flags, data or model leaves no folder behind
        make_output_dir(out_dir)
    if rank == 0 and not args.eval_only:
        write_json(os.path.join(out_dir, "config.json"), {**dataclasses.asdict(args), "device_used": str(device),
                   "world_size": world, "train_prompts": len(train), "eval_prompts_used": len(evalset),
                   "train_eval_overlap": overlap})
    if saved is not None:
        log(f"resumed {out_dir} at round {state['round']}")
    logger = Logger(out_dir, dataclasses.asdict(args), run_name, rank == 0, args.track, args.wandb_project_name,
                    args.wandb_entity)
    per_rank = args.prompts_per_round // world
    t_start = time.time() - state["wall_time_s"]

    if args.eval_only:  # BOILERPLATE: evaluate a checkpoint (e.g. --resume run --eval-only --eval-samples 16)
        res = {"round": state["round"], **evaluate(policy, tok, eval_prompts, eval_golds, args, rank, world, engine)}
        if rank == 0:
            write_json(os.path.join(out_dir, "eval.json"), res)
        log(f"round {state['round']}: {accuracy_text(res, args.eval_samples)} on {len(eval_prompts)} prompts; "
            f"{out_dir}/eval.json")
        if engine is not None:
            engine.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        return

    if state["initial_eval"] is None:
        res = evaluate(policy, tok, eval_prompts, eval_golds, args, rank, world, engine)
        state["initial_eval"] = res["eval/accuracy"]
        state["evals"].append({"round": 0, **res})
        logger.scalars(res, 0)
        log(f"round 0: {accuracy_text(res, args.eval_samples)}")
    bar = tqdm(total=args.total_rounds, initial=state["round"], desc=exp_name, unit="round", disable=rank != 0,
               dynamic_ncols=True)
    for rnd in range(state["round"], args.total_rounds):
        t0 = time.time()
        rng = random.Random(f"{args.seed}-{rnd}")  # the round's prompts: the same on every rank (each takes a slice)
        # and independent of where a run was resumed
        chosen = rng.sample(range(len(train)), args.prompts_per_round)[rank * per_rank:(rank + 1) * per_rank]
        prompts, golds = [to_prompt(train[i]["question"]) for i in chosen], [train[i]["answer"] for i in chosen]
        # 1. rollouts: group_size samples per prompt from the current policy
        policy.eval()
        try:
            batch = generate(policy, tok, prompts, args.group_size, args, engine=engine,
                             seeds=[request_seed(args.seed, rnd, rank, i) for i in range(len(prompts))])
        except RuntimeError as e:  # sampling from inf/nan probabilities: the previous update diverged
            if "inf" not in str(e) and "nan" not in str(e):
                raise
            raise Diverged(f"non-finite next-token probabilities at round {rnd + 1}; the run stops (lower the "
                           f"learning rate)") from None
        policy.train()
        t_gen = time.time()
        # 2. verifier rewards
        rewards_list, fmt = score(batch["texts"], [g for g in golds for _ in range(args.group_size)], args)
        rewards = torch.tensor(rewards_list, dtype=torch.float32, device=device)
        t_rew = time.time()
        gap = torch.zeros((), device=device)
        if engine is not None:  # the engine's sampling log-probs against the trainer's; then it sleeps (CUDA)
            with amp():
                gap = logprob_gap(model, batch, args)
            batch.pop("engine_logp")
            engine.sleep()
        # 3. the algorithm's update(s)
        updates_before = state["updates"]
        # >>> algo: ReVal, Algorithm 1: cache the fresh rollouts' reference terms and push them to the FIFO buffer;
        # one update (Eq. 2) on them, K - 1 on uniform buffer samples of the same size; every ref_reset_every rounds
        # pi_ref <- pi_theta (Sec. 5.5.3)
        batch["reward"] = shaped_rewards(rewards, args.group_size, args.reward_mode)
        with amp():  # the reference's terms in the training forward's precision
            batch["ref_v1"], batch["ref_logp"] = reference_terms(ref_model, batch, args)
        buffer_add(state["buffer"], split_items(batch), state["algo_rounds"])
        metrics = optimizer_step(model, opt, batch, args, world, amp)
        state["updates"] += 1
        replay_rng = random.Random(f"{args.seed}-replay-{state['algo_rounds']}-{rank}")
        ages = []
        for _ in range(args.updates_per_round - 1):
            items = buffer_sample(state["buffer"], batch["completion_ids"].shape[0], replay_rng)
            ages += [state["algo_rounds"] - it["round"] for it in items]
            metrics = optimizer_step(model, opt, collate(items, tok.pad_token_id, device), args, world, amp)
            state["updates"] += 1
            state["replay_updates"] += 1
        state["algo_rounds"] += 1
        if args.ref_reset_every and state["algo_rounds"] % args.ref_reset_every == 0:
            with amp():
                reset_reference(model, ref_model, tok, state, args)
        uses = state["buffer"]["evicted_uses"]
        metrics.update({"replay/size": len(state["buffer"]["items"]), "replay/ref_resets": state["ref_resets"],
                        "replay/mean_age_rounds": float(np.mean(ages)) if ages else 0.0,
                        "replay/uses_per_evicted_trajectory": float(np.mean(uses)) if uses else 0.0})
        # <<< algo
        check_finite({k: v for k, v in metrics.items() if k in ("train/loss", "train/grad_norm")}, f"round {rnd + 1}")
        if not all_finite(policy):
            raise Diverged(f"non-finite model parameters after round {rnd + 1}; the run stops")
        t_upd = time.time()
        if engine is not None:  # the updated policy into the engine (FSDP: one parameter gathered at a time)
            engine.load_weights(policy_weights(policy, torch.bfloat16 if args.bf16 else torch.float32))
        t_sync = time.time()
        state["round"], state["generated"] = rnd + 1, state["generated"] + args.prompts_per_round * args.group_size
        local = {"reward": rewards.sum(), "completions": torch.tensor(float(len(rewards_list)), device=device),
                 "tokens": batch["completion_mask"].sum().float(), "truncated": batch["truncated"].float().sum(),
                 "formatted": torch.tensor(fmt * len(rewards_list), device=device),
                 "prompt_tokens": batch["prompt_mask"].sum().float(), "logprob_gap": gap.float()}
        sums = dict(zip(local, all_reduce_sum(torch.stack(list(local.values()))).tolist()))  # over ranks
        n, gen_tokens = max(sums["completions"], 1.0), sums["tokens"]
        metrics.update({
            "train/reward": sums["reward"] / n, "train/format_rate": sums["formatted"] / n,
            "completions/mean_length": gen_tokens / n, "completions/clipped_ratio": sums["truncated"] / n,
            "time/generation_s": t_gen - t0, "time/reward_s": t_rew - t_gen, "time/update_s": t_upd - t_rew,
            "time/round_s": t_upd - t0, "time/generation_tokens_per_s": gen_tokens / max(t_gen - t0, 1e-9),
            # tokens through forward + backward in the update phase (old/ref log-prob passes not counted)
            "time/train_tokens_per_s": (gen_tokens + sums["prompt_tokens"]) * (state["updates"] - updates_before)
            / max(t_upd - t_rew, 1e-9),
        })
        if engine is not None:
            metrics.update({"rollout/logprob_gap": sums["logprob_gap"] / max(gen_tokens, 1.0),
                            "time/weight_sync_s": t_sync - t_upd})
        logger.scalars(metrics, rnd + 1)
        state.setdefault("reward_history", []).append([rnd + 1, metrics["train/reward"]])
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['train/reward']:.2f}")
        if (rnd + 1) % args.eval_every == 0 or rnd + 1 == args.total_rounds:
            res = evaluate(policy, tok, eval_prompts, eval_golds, args, rank, world, engine)
            state["evals"].append({"round": rnd + 1, **res})
            logger.scalars(res, rnd + 1)
            (bar.write if rank == 0 else log)(f"round {rnd + 1}: {accuracy_text(res, args.eval_samples)}")
        state["wall_time_s"] = time.time() - t_start
        if (rnd + 1) % args.checkpoint_every == 0 or rnd + 1 == args.total_rounds:
            save_checkpoint(out_dir, model, ref_model, tok, opt, state, args, rank)
    bar.close()
    if rank == 0:
        finish_run(out_dir, args, state, world, time.time() - t_start, exp_name, log,
                   {k: v for k, v in state.items() if k in SUMMARY_KEYS})
    logger.close()
    if engine is not None:
        engine.close()
    if dist.is_initialized():  # wait for rank 0's checkpoint and summary: a rank leaving early can abort the group
        dist.barrier()
        dist.destroy_process_group()
# <<< shared:main


SUMMARY_KEYS = ("updates", "replay_updates", "ref_resets")


if __name__ == "__main__":
    run_cli(main)
