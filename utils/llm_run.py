"""Run harness of the LLM scripts (grpo_llm.py, reval_llm.py): flags, run folder, checkpoint files, summary.

What a round does stays in each script; how its flags are parsed and checked, where its files go and how a
checkpoint (a save_pretrained folder plus trainer_state.pt) is written and read is here.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Callable, Optional

import torch

from utils.common import (
    SEED_RANGE,
    UserError,
    check_flags,
    check_output_dir,
    cli_with_presets,
    config_table,
    get_rng_state,
    in_use_error,
    lock_holder,
    peek_args,
    register_run,
    resumed_args,
    save_curves_png,
    write_json,
)
from utils.llm_dist import full_state, gather_to_rank0, read_trainer_state, swap_in_folder, unwrap
from utils.llm_task import BUILTIN

CHECKPOINT_FORMAT = 2  # trainer_state.pt of another format is refused in one line (no migrations)
COMMON_RANGES = {"seed": SEED_RANGE, "temperature": "(0, inf)", "reward_timeout": "(0, 600]",
                 "learning_rate": "(0, inf)", "weight_decay": "[0, inf)", "max_grad_norm": "(0, inf)",
                 "eval_samples": "[0, inf)", "total_rounds": "[0, inf)", "plan_gpus": "[0, inf)",
                 "vllm_gpu_memory_utilization": "(0, 1]",
                 **{name: "[1, inf)" for name in ("prompts_per_round", "group_size", "max_new_tokens",
                                                  "max_prompt_tokens", "micro_batch_size", "eval_every",
                                                  "eval_prompts", "eval_batch_size", "checkpoint_every")}}
# Flags that may change when a run is resumed (budgets, evaluation, logging, hardware, the learning rate, applied to
# the restored optimizer); any other flag given with --resume must equal the checkpoint's.
RESUME_MAY_CHANGE = {"resume", "output_dir", "overwrite", "device", "bf16", "fsdp", "gradient_checkpointing",
                     "rollout_engine", "vllm_gpu_memory_utilization",
                     "plan_gpus", "track", "wandb_project_name", "wandb_entity", "total_rounds", "eval_every",
                     "eval_samples", "eval_batch_size", "checkpoint_every", "micro_batch_size", "learning_rate",
                     "max_grad_norm", "reward_timeout", "eval_only", "eval_prompts"}


def model_defaults(args) -> dict:
    """Defaults that depend on --model: the learning rate (the built-in 1M-parameter model trains at 5e-5; real
    models at the ReVal paper's 1e-6)."""
    return {"learning_rate": 5e-5 if args.model == BUILTIN else 1e-6}


def parse_flags(args_cls, argv: Optional[list], defaults: Callable, algo_may_change: set, algo_ranges: dict) -> tuple:
    """(args, checkpoint folder or None, its trainer state or None). A new run: ``defaults(args)`` then the flags
    given (--help shows them resolved); --resume: the saved flags, then those given, which must be among
    RESUME_MAY_CHANGE | ``algo_may_change``. Every flag's range is checked before anything loads."""
    args, resume_dir, saved = peek_args(args_cls, argv), None, None
    if args.resume:
        resume_dir, saved = read_trainer_state(args.resume, CHECKPOINT_FORMAT)
        folder = os.path.dirname(os.path.abspath(resume_dir))
        args = resumed_args(args_cls, argv, saved, folder, RESUME_MAY_CHANGE | algo_may_change,
                            f"--resume {args.resume}")
    else:
        args = cli_with_presets(args_cls, argv, defaults)
    check_flags(args, {**COMMON_RANGES, **algo_ranges})
    if args.eval_only and saved is None:
        raise UserError("--eval-only evaluates a checkpoint: give the run with --resume DIR")
    return args, resume_dir, saved


def resolve_hardware(args, device: torch.device, world: int, saved: Optional[dict]) -> None:
    """The defaults that depend on the machine (bf16 on GPUs that have it; FSDP for real models under torchrun), the
    prompt template of the model, and the checks that need the world size."""
    if args.prompts_per_round % world:
        raise UserError(f"--prompts-per-round {args.prompts_per_round} must be divisible by the {world} ranks")
    if saved is not None and len(saved["ranks"]) != world:  # each rank resumes its own random streams and state
        raise UserError(f"--resume: the checkpoint was written by {len(saved['ranks'])} processes; resume it with "
                        f"as many (torchrun --nproc_per_node {len(saved['ranks'])})")
    if args.bf16 is None:
        args.bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if args.fsdp is None:  # shard real models under torchrun (a 7B model does not fit a GPU replicated, with AdamW)
        args.fsdp = world > 1 and args.model != BUILTIN
    args.fsdp = args.fsdp and world > 1  # nothing to shard over in one process
    if args.prompt_template == "auto":
        args.prompt_template = "plain" if args.model == BUILTIN else "r1"


def start_run(script: str, args, rank: int, world: int, device: torch.device, resume_dir: Optional[str],
              log: Callable) -> tuple:
    """(experiment name, run name, output folder): checked on rank 0 (created later), flags printed."""
    exp_name = os.path.basename(script)[: -len(".py")]
    run_name = f"{os.path.basename(args.model.rstrip('/'))}__{exp_name}__{args.seed}__{int(time.time())}"
    out_dir = args.output_dir or os.path.join("runs", run_name)
    in_place = resume_dir is not None and os.path.abspath(out_dir) == os.path.dirname(os.path.abspath(resume_dir))
    if rank == 0:
        check_output_dir(out_dir, resuming=in_place, overwrite=args.overwrite)
    register_run(out_dir, os.path.join(out_dir, "checkpoint", "trainer_state.pt"))
    log(f"{exp_name}, device {device} x {world}; flags after defaults (also in config.json):\n"
        f"{config_table(dataclasses.asdict(args))}")
    return exp_name, run_name, out_dir




def already_finished(args, resume_dir: Optional[str], saved: Optional[dict]) -> bool:
    """A --resume of a finished run whose --total-rounds was not raised: say so and touch nothing (True);
    --eval-only and a larger --total-rounds go on."""
    if saved is None or args.eval_only:
        return False
    folder = os.path.dirname(os.path.abspath(resume_dir))
    rounds = saved["ranks"][0]["state"]["round"]
    if rounds < args.total_rounds or not os.path.isfile(os.path.join(folder, "summary.json")):
        return False
    holder = lock_holder(folder)
    if holder is not None:
        raise in_use_error(folder, holder)
    if os.environ.get("RANK", "0") == "0":
        print(f"{folder} is a finished run ({rounds} rounds, --total-rounds {args.total_rounds}); nothing was "
              f"changed. Raise --total-rounds to continue it, or evaluate it with --eval-only")
    return True


def accuracy_text(res: dict, eval_samples: int) -> str:
    return f"eval accuracy {res['eval/accuracy']:.3f}" + (
        f", sampled mean@{eval_samples} {res['eval/accuracy_sampled']:.3f}" if eval_samples else "")


def save_checkpoint(out_dir: str, model, ref_model, tok, opt, state: dict, args, rank: int) -> None:
    """checkpoint/ holds a plain save_pretrained model + tokenizer (fp32, loadable by transformers and vLLM),
    reference/ when the frozen model is no longer the initial one (ReVal's resets), and trainer_state.pt (optimizer
    by parameter name, each rank's RNG and state, the flags). Every rank calls it (FSDP gathers the shards to rank
    0, which writes); written to a temporary folder, then swapped in, so a crash leaves the previous checkpoint."""
    model_sd, optim_sd = full_state(model, opt)
    ref_sd = full_state(ref_model)[0] if state.get("ref_resets") else None
    ranks = gather_to_rank0({"rng": get_rng_state(), "state": state})  # e.g. ReVal's replay buffer is per rank
    if rank != 0:
        return
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".checkpoint-")
    unwrap(model).save_pretrained(tmp, state_dict=model_sd)
    tok.save_pretrained(tmp)
    if ref_sd is not None:
        unwrap(ref_model).save_pretrained(os.path.join(tmp, "reference"), state_dict=ref_sd)
        tok.save_pretrained(os.path.join(tmp, "reference"))
    # tensors and plain values only: loading it never executes code (torch.load(weights_only=True))
    torch.save({"format": CHECKPOINT_FORMAT, "optimizer": optim_sd, "ranks": ranks, "args": dataclasses.asdict(args)},
               os.path.join(tmp, "trainer_state.pt"))
    swap_in_folder(tmp, os.path.join(out_dir, "checkpoint"))


def finish_run(out_dir: str, args, state: dict, world: int, wall_s: float, exp_name: str, log: Callable,
               extra: dict) -> None:
    """Rank 0: summary.json, learning_curve.png (greedy and sampled accuracy, training reward), the last line."""
    first, last = state["evals"][0], state["evals"][-1]
    summary = {"model": args.model, "dataset": args.dataset, "seed": args.seed,
               "initial_eval_accuracy": state["initial_eval"], "final_eval_accuracy": last["eval/accuracy"],
               "initial_eval_accuracy_sampled": first.get("eval/accuracy_sampled"),
               "final_eval_accuracy_sampled": last.get("eval/accuracy_sampled"), "rounds": state["round"],
               "generated_trajectories": state["generated"], "wall_time_s": wall_s, "world_size": world,
               "output_dir": out_dir, **extra}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    rounds = [e["round"] for e in state["evals"]]
    curves = {"greedy": (rounds, [e["eval/accuracy"] for e in state["evals"]], "held-out accuracy")}
    if args.eval_samples:
        curves[f"sampled mean@{args.eval_samples}"] = (rounds, [e["eval/accuracy_sampled"] for e in state["evals"]],
                                                       "held-out accuracy")
    if state.get("reward_history"):
        curves["training reward"] = (*zip(*state["reward_history"]), "mean verifier reward per round")
    save_curves_png(os.path.join(out_dir, "learning_curve.png"), curves, "round",
                    f"{os.path.basename(args.model.rstrip('/'))}: {exp_name}, seed {args.seed}")
    sampled = (f", sampled mean@{args.eval_samples} {summary['initial_eval_accuracy_sampled']:.3f} -> "
               f"{summary['final_eval_accuracy_sampled']:.3f}" if args.eval_samples else "")
    log(f"eval accuracy (greedy) {summary['initial_eval_accuracy']:.3f} -> {summary['final_eval_accuracy']:.3f}"
        f"{sampled} after {summary['rounds']} rounds; {out_dir}/summary.json")
