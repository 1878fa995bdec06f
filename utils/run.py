"""Run harness of the EDIS scripts (edis_iql.py, edis_calql.py): the device, the run folder, checkpoint files.

What a checkpoint *holds* is written in each script (``checkpoint_state`` / ``restore``); how it is written (atomically,
with one format version), found, checked against the flags given with ``--resume`` and loaded is here.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import torch

from utils.common import (
    UserError,
    atomic_torch_save,
    atomic_write_bytes,
    check_output_dir,
    resumed_args,
    safe_torch_load,
)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 3  # any other format is refused in one line (no migrations)


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


def find_checkpoint(resume: str) -> str:
    path = resume if resume.endswith(".pt") else os.path.join(resume, CHECKPOINT)
    if not os.path.isfile(path):
        raise UserError(f"--resume {resume!r}: no checkpoint at {path}")
    return path


def start_run(script: str, task: str, seed: int, output_dir: Optional[str], resume: Optional[str],
              overwrite: bool) -> tuple:
    """(experiment name, run name, output folder) of a run; the folder is checked (not created) here."""
    exp_name = os.path.basename(script)[: -len(".py")]
    run_name = f"{task}__{exp_name}__{seed}__{int(time.time())}"
    out_dir = output_dir or os.path.join("runs", run_name)
    in_place = resume is not None and os.path.abspath(out_dir) == os.path.dirname(os.path.abspath(
        find_checkpoint(resume)))
    check_output_dir(out_dir, resuming=in_place, overwrite=overwrite)
    return exp_name, run_name, out_dir


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


def write_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())
