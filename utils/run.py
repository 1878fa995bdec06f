"""Run harness of the EDIS scripts (edis_iql.py, edis_calql.py): the device, the run folder, checkpoint files.

What a checkpoint *holds* is written in each script (``checkpoint_state`` / ``restore``); how it is written (atomically,
with one format version), found, checked against the flags given with ``--resume`` and loaded is here.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import torch

from utils.common import (
    SEED_RANGE,
    UserError,
    atomic_torch_save,
    check_flags,
    check_output_dir,
    cli_with_presets,
    config_table,
    in_use_error,
    lock_holder,
    peek_args,
    register_run,
    resumed_args,
    safe_torch_load,
    save_curves_png,
    write_json,
)

CHECKPOINT = "checkpoint.pt"
# Allowed values of the flags both EDIS scripts share (flag validation, before anything loads)
COMMON_RANGES = {
    "seed": SEED_RANGE, "gamma": "[0, 1]", "tau": "[0, 1]", "edis_ratio": "[0, 1)",
    "offline_steps": "[0, inf)", "online_steps": "[0, inf)",
    **{name: "[1, inf)" for name in (
        "eval_every", "eval_episodes", "checkpoint_every", "log_every", "batch_size", "utd", "hidden_dim",
        "edis_retrain_every", "edis_num_samples", "edis_diffusion_steps", "edis_width", "edis_depth",
        "edis_sample_steps", "energy_negatives", "energy_pool", "energy_steps")},
}
CHECKPOINT_FORMAT = 4  # any other format is refused in one line (no migrations)


def bf16_autocast(device: torch.device, enabled: bool):
    """--bf16: bfloat16 autocast over fp32 weights, without autocast's weight-cast cache. The cache keeps each
    weight's bf16 copy until the outermost autocast region ends; an EDIS retrain trains its denoiser and energies for
    thousands of steps inside one region, so with the cache every forward after the first used the initial weights
    and nothing learned (tests/test_edis_iql.py::test_bf16_retrain_learns_as_fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
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


def preset_defaults(device: torch.device, device_presets: dict, family_presets: dict, task_presets: dict,
                    algo_cpu: dict) -> dict:
    """An EDIS script's defaults on ``device``: the device preset, then the task family's, then the task's (later
    ones win; on CPU the device's budgets win over the family's GPU-scale sizes, the algorithm's CPU sizes over
    both); bf16 on GPUs that have it."""
    merged = {**device_presets["cuda" if device.type == "cuda" else "cpu"]}
    for k, v in {**family_presets, **task_presets}.items():
        if not (device.type != "cuda" and k in merged):
            merged[k] = v
    if device.type != "cuda":
        merged.update(algo_cpu)
    merged["bf16"] = native_bf16(device) and (device.type == "cuda" or BF16_CPU_DEFAULT)
    return merged


# bf16 by default on a CPU that computes it natively only where the evidence shows no loss against fp32; the toy of
# study 3a and one study-2 seed per algorithm under --bf16 lean slightly against it (docs/results.md, study 4), so
# on a CPU --bf16 opts in.
BF16_CPU_DEFAULT = False


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 units, a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: unknown, fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def set_precision(device: torch.device, bf16: bool, tf32: bool) -> dict:
    """TF32 for fp32 matmuls on CUDA unless --no-tf32; what the run computes in, printed and for config.json."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    p = {"autocast": "bf16" if bf16 else "off", "fp32_matmul": "tf32" if tf32 and device.type == "cuda" else "ieee",
         "native_bf16": native_bf16(device)}
    hint = " (this device computes bf16 natively: --bf16)" if p["native_bf16"] and not bf16 else ""
    print(f"precision: fp32 weights, autocast {p['autocast']}, fp32 matmuls {p['fp32_matmul']}{hint}")
    return p


def parse_flags(args_cls, argv: Optional[list], presets: Callable, frozen: Callable, algo_ranges: dict,
                infinite_ok: tuple) -> tuple:
    """(args, checkpoint or None) of an EDIS script's command line: the presets of --env on --device, then the flags
    given; with --resume, the checkpoint's flags, then those given (``frozen(checkpoint)`` may not change). Every
    flag's range is checked before anything loads; --help shows the resolved defaults."""
    args, ckpt = peek_args(args_cls, argv), None
    if args.resume:
        ckpt, args = load_checkpoint(args_cls, args.resume, argv, frozen)
    else:
        args = cli_with_presets(args_cls, argv, presets)
    check_flags(args, {**COMMON_RANGES, **algo_ranges}, infinite_ok)
    if args.eval_only and ckpt is None:
        raise UserError("--eval-only evaluates a checkpoint: give the run with --resume DIR")
    return args, ckpt


def write_eval(out_dir: str, task: str, step: int, res: dict) -> None:
    """--eval-only: eval.json and one line."""
    write_json(os.path.join(out_dir, "eval.json"), {"step": step, **res})
    print(f"{task}: normalized score {res['eval/normalized_score']:.1f} (success {res['eval/success_rate']:.2f}) at "
          f"step {step}; {out_dir}/eval.json")


def make_args(script, **flags):
    """An EDIS script's Args as its command line gives them (presets of flags["env"], then the flags), checked: for
    using the script from Python (benchmarks)."""
    given = script.Args(**flags)
    args = dataclasses.replace(given, **{**script.preset_values(given), **flags})
    check_flags(args, {**COMMON_RANGES, **script.ALGO_RANGES}, script.INFINITE_OK)
    return args


def find_checkpoint(resume: str) -> str:
    path = resume if resume.endswith(".pt") else os.path.join(resume, CHECKPOINT)
    if not os.path.isfile(path):
        raise UserError(f"--resume {resume!r}: no checkpoint at {path}")
    return path


def start_run(script: str, task: str, args, device: torch.device) -> tuple:
    """(experiment name, run name, output folder) of a run, its flags printed; the folder is checked, not created."""
    exp_name = os.path.basename(script)[: -len(".py")]
    run_name = f"{task}__{exp_name}__{args.seed}__{int(time.time())}"
    out_dir = args.output_dir or os.path.join("runs", run_name)
    in_place = args.resume is not None and os.path.abspath(out_dir) == os.path.dirname(os.path.abspath(
        find_checkpoint(args.resume)))
    check_output_dir(out_dir, resuming=in_place, overwrite=args.overwrite)
    register_run(out_dir, os.path.join(out_dir, CHECKPOINT))
    print(f"{exp_name} on {task}, device {device}; flags after presets (also in config.json):\n"
          f"{config_table(dataclasses.asdict(args))}")
    return exp_name, run_name, out_dir


def already_finished(ckpt: Optional[dict], args) -> bool:
    """A --resume of a finished run whose budget was not raised: say so and touch nothing (True); --eval-only and a
    larger --offline-steps / --online-steps go on."""
    if ckpt is None or args.eval_only:
        return False
    folder = os.path.dirname(os.path.abspath(find_checkpoint(args.resume)))
    total = args.offline_steps + args.online_steps
    if ckpt["step"] < total or not os.path.isfile(os.path.join(folder, "summary.json")):
        return False
    holder = lock_holder(folder)
    if holder is not None:
        raise in_use_error(folder, holder)
    print(f"{folder} is a finished run ({ckpt['step']} steps, the budget is {total}); nothing was changed. Raise "
          f"--online-steps to continue it, or evaluate it with --eval-only")
    return True


def finish_run(out_dir: str, summary: dict, progress: dict, offline_steps: int, title: str) -> None:
    """summary.json and learning_curve.png (evaluations and online training episodes), then the last line."""
    write_json(os.path.join(out_dir, "summary.json"), summary)
    curves = {"evaluation": ([e["step"] for e in progress["evals"]],
                             [e["eval/normalized_score"] for e in progress["evals"]], "D4RL normalized score")}
    if progress["episode_scores"]:
        curves["online training episodes"] = (*zip(*progress["episode_scores"]), "D4RL normalized score")
    save_curves_png(os.path.join(out_dir, "learning_curve.png"), curves,
                    "step (offline updates, then online env steps)", title, vline=(offline_steps, "offline -> online"))
    print(f"{summary['env']}: normalized score {summary['offline_normalized_score']:.1f} (offline) -> "
          f"{summary['final_normalized_score']:.1f} (after {summary['online_env_steps']} online steps); "
          f"{out_dir}/summary.json")


def save_checkpoint(path: str, state: dict) -> None:
    """Atomically write ``state`` (tensors and plain values only: loading it never executes code)."""
    atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, path)


def load_checkpoint(args_cls, resume: str, argv: Optional[list], frozen: Callable[[dict], set]) -> tuple:
    """``--resume``: (checkpoint, config). The config is the saved flags overridden by the ones given now; those in
    ``frozen(checkpoint)`` (what the networks, data and algorithm were built from) must equal the saved ones."""
    path = find_checkpoint(resume)
    ckpt = safe_torch_load(path, f"--resume {resume}")
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        raise UserError(f"--resume {resume}: {path} has checkpoint format {fmt}, this script reads format "
                        f"{CHECKPOINT_FORMAT}; resume it with the version that wrote it, or start a new run")
    folder = os.path.dirname(os.path.abspath(path))
    args = resumed_args(args_cls, argv, ckpt, folder, None, f"--resume {resume}", frozen=frozen(ckpt))
    newer = os.path.join(folder, CHECKPOINT)
    if args.output_dir == folder and os.path.abspath(path) != newer and os.path.isfile(newer):
        raise UserError(f"--resume {path}: continuing here would overwrite {newer}, the run's latest checkpoint; "
                        f"pass --output-dir NEW_FOLDER to continue from {os.path.basename(path)} there")
    return ckpt, args


def restore_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping the learning rates of the current flags (a --resume may change them)."""
    lrs = [g["lr"] for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr


def reset_seed(seed: int, episode: int) -> int:
    """Online episode k starts from env.reset(seed=f(k)): a resumed run restarts where the killed one was."""
    return (seed * 1_000_003 + 7_919 * (episode + 1)) % 2**32


