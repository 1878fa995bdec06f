"""Infrastructure helpers: user-facing errors, flag checks, seeding and RNG state, safe checkpoint files, run folders.

Every script calls ``run_cli(main)``: a ``UserError`` raised anywhere (bad flag value, missing dataset, no network,
a diverged run) becomes one line on stderr and exit status 2, never a traceback. Programming errors still raise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import shlex
import shutil
import socket
import sys
import tempfile
from typing import Any, Callable, Optional

import numpy as np

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix (a flag, a path, a missing download); shown as one line, no traceback."""


class Diverged(UserError):
    """Training produced a non-finite loss or parameter: the run stops; ``run_cli`` says whether a checkpoint (always
    written before) is there to resume, or gives the command that starts afresh."""


def check_finite(metrics: dict, where: str) -> dict:
    """``metrics`` if every value is finite; else stop the run (Diverged), naming the first bad metric and ``where``."""
    bad = [k for k, v in metrics.items() if not math.isfinite(float(v))]
    if bad:
        raise Diverged(f"non-finite {bad[0]} at {where}; the run stops (lower the learning rate, check the data and "
                       f"the flags)")
    return metrics


def check_finite_params(module, where: str) -> None:
    """Stop the run (Diverged) if a parameter of ``module`` is not finite: nothing non-finite is evaluated or saved."""
    import torch

    if not all(torch.isfinite(p).all() for p in module.parameters()):
        raise Diverged(f"non-finite network parameters at {where}; the run stops (lower the learning rates)")


# ---------------------------------------------------------------------------------------------------------------
# Flag checks (run right after parsing, before anything slow)
# ---------------------------------------------------------------------------------------------------------------
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_INTERVAL = re.compile(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])")


def check_flags(args, ranges: dict, infinite_ok: tuple = ()) -> None:
    """Every float flag must be a finite number (tyro accepts 'nan' and 'inf'; ``infinite_ok`` names those that may
    be +-inf), and each flag named in ``ranges`` must lie in its interval, written as in mathematics:
    ``{"gamma": "[0, 1]", "critic_lr": "(0, inf)"}``. None is skipped (a preset fills it in later)."""
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and f.name not in infinite_ok)):
            raise UserError(f"{flag(f.name)} must be a finite number, got {v}")
    for name, interval in ranges.items():
        v = getattr(args, name)
        if v is None:
            continue
        lo_b, lo, hi, hi_b = _INTERVAL.fullmatch(interval).groups()
        lo, hi = float(lo), float(hi)
        ok = (v > lo if lo_b == "(" else v >= lo) and (v < hi if hi_b == ")" else v <= hi)
        if not ok:
            want = (f"{'>' if lo_b == '(' else '>='} {lo:g}" if hi == math.inf else f"in {interval}")
            raise UserError(f"{flag(name)} must be {want}, got {v}")


SEED_RANGE = "[0, 4294967295]"  # what numpy's legacy seeding accepts


def resumed_args(args_cls, argv, checkpoint, folder: str, may_change: Optional[set], what: str,
                 frozen: Optional[set] = None):
    """The config of a resumed run: the checkpoint's flags overridden by the ones given now, which must be among
    ``may_change`` (or, with ``frozen``, outside it). ``--output-dir`` defaults to the checkpoint's ``folder``; a
    different one branches the run there."""
    import tyro

    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    try:
        saved_args = args_cls(**saved)
    except TypeError:
        unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(args_cls)}) if isinstance(saved, dict) else []
        hint = (f" (or of another version of it: its flags {', '.join(flag(k) for k in unknown)} do not exist here; "
                f"resume it with the version that wrote it)") if unknown and len(unknown) < len(saved) / 2 else ""
        raise UserError(f"{what}: {folder} holds a checkpoint that is not a checkpoint of this script{hint}") from None
    argv = tristate_flags(args_cls, list(sys.argv[1:] if argv is None else argv))
    args = tyro.cli(args_cls, args=argv, default=saved_args)
    check_resume_flags(saved, dataclasses.asdict(args), may_change, frozen)
    if args.output_dir is None or os.path.abspath(args.output_dir) == os.path.abspath(saved_args.output_dir or folder):
        args.output_dir = folder
    return args


def tristate_flags(args_cls, argv: list) -> list:
    """``argv`` with the bare forms of Optional[bool] flags (None: decided by the machine) spelled out: ``--fsdp`` ->
    ``--fsdp True``, ``--no-fsdp`` -> ``--fsdp False``; ``--fsdp False`` and the rest pass unchanged."""
    names = {flag(f.name) for f in dataclasses.fields(args_cls) if str(f.type).replace(" ", "") in (
        "Optional[bool]", "bool|None", "typing.Optional[bool]")}
    out = []
    for i, a in enumerate(argv):
        if a in names and (i + 1 == len(argv) or argv[i + 1] not in ("True", "False", "None")):
            out += [a, "True"]
        elif a.startswith("--no-") and "--" + a[5:] in names:
            out += ["--" + a[5:], "False"]
        else:
            out.append(a)
    return out


def peek_args(args_cls, argv: Optional[list], default=None):
    """The flags of ``argv`` parsed without answering ``--help``: what decides how the real parse is done (--resume,
    the task, a preset), before the parse that prints the help with the resolved defaults."""
    import tyro

    argv = tristate_flags(args_cls, list(sys.argv[1:] if argv is None else argv))
    return tyro.cli(args_cls, args=[a for a in argv if a not in ("-h", "--help")], default=default)


def cli_with_presets(args_cls, argv: Optional[list], presets: Callable[[Any], dict]):
    """Parse the command line over preset defaults, the one preset mechanism of all four scripts.

    ``presets(args)`` maps parsed flags (the task, the device, a --preset name, the model) to default values of
    other flags. The command line is parsed over them, so a flag given explicitly always wins, and again until the
    defaults stop changing (a preset may set the flag another one depends on: a paper preset sets --model, which sets
    the learning rate). ``--help`` is answered by the last parse, so it shows the values this run would use."""
    import tyro

    defaults = args_cls()
    for _ in range(5):
        new = dataclasses.replace(args_cls(), **presets(peek_args(args_cls, argv, defaults)))
        if new == defaults:
            break
        defaults = new
    args = tyro.cli(args_cls, args=tristate_flags(args_cls, list(sys.argv[1:] if argv is None else argv)),
                    default=defaults)
    changed = preset_changes(args_cls(), defaults, args)
    if changed and os.environ.get("RANK", "0") == "0":  # say what the presets changed, so no default is silent
        print(f"presets set: {changed}")
    return args


def preset_changes(plain, preset, final) -> str:
    """'--flag value' for every flag whose preset value differs from the dataclass default, marking the ones the
    command line then overrode."""
    out = []
    for f in dataclasses.fields(plain):
        p, v = getattr(preset, f.name), getattr(final, f.name)
        if p != getattr(plain, f.name):
            out.append(f"{flag(f.name)} {p}" + ("" if v == p else f" (overridden: {v})"))
    return ", ".join(out) + ("; flags given on the command line override them" if out else "")


def check_resume_flags(saved: dict, now: dict, may_change: Optional[set], frozen: Optional[set] = None) -> list:
    """Flags given together with ``--resume`` that differ from the checkpoint's: a UserError for those outside
    ``may_change`` or inside ``frozen`` (network sizes, data, the algorithm's definition), else the list of changed
    names (applied)."""
    changed = [k for k in now if k in saved and now[k] != saved[k]]
    frozen = [k for k in changed if (k in frozen if frozen is not None else k not in may_change)]
    if frozen:
        what = ", ".join(f"{flag(k)} {now[k]} (checkpoint: {saved[k]})" for k in frozen)
        raise UserError(f"--resume: {what} cannot change when a run is resumed; start a new run instead")
    return changed


def run_cli(main: Callable[[], Any]) -> None:
    """Run ``main`` and turn a ``UserError`` (or Ctrl-C) into a one-line message and a non-zero exit. Progress bars
    are closed first, so the message is the last thing on the terminal."""
    try:
        main()
    except UserError as e:
        close_progress_bars()
        msg = " ".join(str(e).split())  # one line, whatever the message's formatting
        if isinstance(e, Diverged):
            msg += "; " + after_divergence()
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        release_run_folders()


def close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


# The run of this process (set by the harness once its folder is known): where a diverged run can go on from
CURRENT_RUN: dict = {}


def register_run(folder: str, checkpoint: str) -> None:
    """Record the run folder and the file whose existence means "a checkpoint can be resumed"."""
    CURRENT_RUN.update(folder=folder, checkpoint=checkpoint)


def after_divergence() -> str:
    """What a user can do after a divergence: resume the last checkpoint, or the exact command that starts afresh."""
    folder, ckpt = CURRENT_RUN.get("folder"), CURRENT_RUN.get("checkpoint")
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "the script"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    if folder and ckpt and os.path.exists(ckpt):
        return (f"its last checkpoint is kept: continue from it with `{launcher} {script} --resume {folder}` and "
                f"lower learning rates")
    argv = list(sys.argv[1:])
    if folder and "--output-dir" not in argv and not any(a.startswith("--output-dir=") for a in argv):
        argv += ["--output-dir", folder]
    if "--overwrite" not in argv:
        argv.append("--overwrite")
    where = f" in {folder}" if folder else ""
    return (f"no checkpoint was written{where}, so there is nothing to resume; start afresh (after changing the "
            f"flags) with `{launcher} {script} {' '.join(shlex.quote(a) for a in argv)}`")


def env_flag(name: str) -> bool:
    """An environment variable set to a true value (1, true, yes, on), as huggingface_hub reads its flags."""
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def network_available(host: str, timeout: float = 3.0) -> bool:
    """One quick TCP connect; offline machines fail here in milliseconds (DNS) instead of after minutes of retries."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """True when the Hugging Face Hub cannot be reached: HF_HUB_OFFLINE is set, or huggingface.co does not answer."""
    return env_flag("HF_HUB_OFFLINE") or not network_available("huggingface.co")


def hub_go_offline() -> None:
    """Use only the local Hugging Face cache from now on. The environment variables are read once, when
    huggingface_hub / datasets are imported (maybe long before, by transformers), so their constants are set too."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


# ---------------------------------------------------------------------------------------------------------------
# Seeding and RNG state (plain types and tensors only, so checkpoints load with torch.load(weights_only=True))
# ---------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, torch_deterministic: bool = True) -> None:
    """Seed python, numpy and torch (CleanRL's seeding block). Envs are seeded separately via ``reset(seed=...)``."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # the data layer works without torch
        return
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def get_rng_state() -> dict:
    """python, numpy, torch (and CUDA) generator states as plain lists / tensors."""
    import torch

    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Files: atomic writes, safe checkpoint loading, run folders
# ---------------------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the user's normal permissions
        os.replace(tmp, path)  # atomic on POSIX and Windows when on the same filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    """Atomically write ``obj`` as indented JSON (values json cannot encode are written with str)."""
    import json

    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file in the same folder, then an atomic rename."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def safe_torch_load(path: str, what: str, mmap: bool = False):
    """``torch.load`` that can never execute code from the file (``weights_only=True``: tensors, numbers, strings,
    lists, tuples and dicts only). A file that is not such a checkpoint is a UserError naming ``what``. ``mmap``:
    tensors stay in the file until used (every rank of a large run may open the same checkpoint)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: {path} is not a checkpoint of this script, or is damaged; it was not loaded "
                        f"({type(e).__name__}: {first[:200]})") from None


STALE_PREFIXES = (".tmp-", ".checkpoint-")  # what an interrupted atomic write leaves behind


def remove_stale_temp_files(folder: str) -> None:
    """Delete the temporary files and folders of writes that a killed run never finished."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(STALE_PREFIXES):
            path = os.path.join(folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)


LOCK_FILE = ".lock"  # in the run folder: locked (flock) by the process writing the run, holding its pid
_HELD_LOCKS: dict = {}  # folder -> the open lock file, kept for the life of the process


def lock_holder(folder: str) -> Optional[str]:
    """The pid of another process holding ``folder``'s lock (as written there; "?" if unreadable), else None. A lock
    file left by a killed process is not held: the OS released its lock when it died."""
    path = os.path.join(folder, LOCK_FILE)
    if os.path.abspath(folder) in _HELD_LOCKS or not os.path.isfile(path):
        return None
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        return None
    try:
        f = open(path)  # read-only is enough for flock
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def in_use_error(folder: str, pid: str) -> UserError:
    return UserError(f"{folder} is in use: another process (pid {pid}) is writing this run; one run folder has one "
                     f"writer. Wait for it to end (or stop it), then resume it with --resume {folder}")


def lock_run_folder(folder: str) -> None:
    """Become the one writer of ``folder`` for the life of this process (an flock the OS releases when the process
    dies, however it dies), or refuse in one line naming the holder's pid."""
    key = os.path.abspath(folder)
    if key in _HELD_LOCKS:
        return
    try:
        import fcntl
    except ImportError:
        return
    try:
        f = open(os.path.join(folder, LOCK_FILE), "a+")
    except OSError as e:
        raise UserError(f"{folder}: cannot write its lock file ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise in_use_error(folder, pid) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD_LOCKS[key] = f


def release_run_folders() -> None:
    """Give up this process's run-folder locks (at the end of ``main``; the OS does it if the process dies)."""
    while _HELD_LOCKS:
        _HELD_LOCKS.popitem()[1].close()


def make_output_dir(path: str) -> None:
    """Create the run folder (a UserError if the system refuses), take its lock and clear what a killed write left."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {path}: cannot create it ({e.strerror})") from None
    lock_run_folder(path)
    remove_stale_temp_files(path)


def check_output_dir(path: str, resuming: bool, overwrite: bool) -> None:
    """Refuse an output folder that cannot be used, before anything slow runs: one another process is writing, a
    file, a folder under a file, an unwritable place, or (for a new run) a folder that already holds something,
    unless ``overwrite`` is given and the folder is an earlier run (it has a config.json), which is then emptied. An
    existing folder is locked here, before anything in it changes."""
    path = os.path.abspath(path)
    holder = lock_holder(path) if os.path.isdir(path) else None
    if holder is not None:
        raise in_use_error(path, holder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output-dir {path} is a file, not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--output-dir {path}: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {path}: {parent} is not writable")
    if resuming or not os.path.isdir(path) or not set(os.listdir(path)) - {LOCK_FILE}:
        if os.path.isdir(path):
            lock_run_folder(path)
        return
    if not overwrite:
        raise UserError(f"--output-dir {path} already holds a run; continue it with --resume {path}, replace it with "
                        f"--overwrite, or choose another folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--overwrite: {path} is not a run folder (no config.json); refusing to empty it")
    lock_run_folder(path)
    for name in set(os.listdir(path)) - {LOCK_FILE}:
        p = os.path.join(path, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)


def config_table(config: dict, width: int = 120) -> str:
    """The resolved flags as one aligned table (``--flag value`` cells, as many columns as fit in ``width``), printed
    at start-up so a run's settings after presets are visible at a glance; config.json holds the same values."""
    cells = [f"--{k.replace('_', '-')} {v}" for k, v in config.items()]
    cell = max(len(c) for c in cells) + 2
    cols = max(1, width // cell)
    rows = (len(cells) + cols - 1) // cols
    lines = []
    for r in range(rows):  # column-major, so related flags (declared together) stay together
        lines.append("".join(cells[c * rows + r].ljust(cell) for c in range(cols) if c * rows + r < len(cells)))
    return "\n".join(line.rstrip() for line in lines)


def save_curves_png(path: str, curves: dict, xlabel: str, title: str, vline: Optional[tuple] = None) -> None:
    """A learning-curve PNG from a run's own records, so a user without TensorBoard sees what happened.

    ``curves``: ``{label: (xs, ys, y axis label)}``; curves that share a y-axis label share a panel. ``vline``:
    ``(x, label)`` marks a phase boundary (e.g. offline -> online). Written atomically, like every run file."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    panels: dict = {}
    for label, (xs, ys, ylabel) in curves.items():
        panels.setdefault(ylabel, []).append((label, xs, ys))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 3.8), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        for label, xs, ys in series:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if vline is not None:
            ax.axvline(vline[0], color="gray", linestyle="--", linewidth=1, label=vline[1])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


class Logger:
    """TensorBoard always (on rank 0: ``enabled``); Weights & Biases only with ``track``, imported only then.

    ``accumulate`` keeps metric tensors without a device sync; ``flush`` averages them with one sync, writes them and
    stops a diverged run (``Diverged``) naming the first step and metric that went non-finite."""

    def __init__(self, out_dir: str, config: dict, run_name: str, enabled: bool = True, track: bool = False,
                 project: str = "reference-rl", entity: Optional[str] = None):
        self.enabled, self.pending, self.pending_steps = enabled, {}, []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(out_dir)
        if track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs wandb: pip install wandb") from None
            wandb.init(project=project, entity=entity, sync_tensorboard=True, config=config, name=run_name,
                       save_code=True)
        table = "\n".join(f"|{k}|{v}|" for k, v in config.items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")

    def scalars(self, metrics: dict, step: int) -> None:
        if self.enabled:
            for k, v in metrics.items():
                self.writer.add_scalar(k, float(v), step)

    def accumulate(self, metrics: dict, step: int) -> None:
        """Keep one update's metric tensors (no device sync) until the next ``flush``."""
        for k, v in metrics.items():
            self.pending.setdefault(k, []).append(v)
        self.pending_steps.append(step)

    def flush(self, step: int) -> dict:
        """Average the accumulated tensors (one sync), write them at ``step`` and return the floats."""
        import torch

        if not self.pending:
            return {}
        keys = list(self.pending)
        values = torch.stack([torch.stack(self.pending[k]).float() for k in keys])  # [metrics, updates]
        bad = ~torch.isfinite(values)
        if bad.any():
            first = int(bad.any(0).nonzero()[0])
            raise Diverged(f"non-finite {keys[int(bad[:, first].nonzero()[0])]} at step {self.pending_steps[first]}; "
                           "the run stops (lower the learning rates or check the data)")
        self.pending, self.pending_steps = {}, []
        out = dict(zip(keys, values.mean(1).tolist()))
        self.scalars(out, step)
        return out

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
