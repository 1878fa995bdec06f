"""Infrastructure helpers: user-facing errors, seeding, atomic writes.

Every script calls ``run_cli(main)``: a ``UserError`` raised anywhere (bad flag value, missing dataset, no network)
becomes one line on stderr and exit status 2, never a traceback. Programming errors still raise normally.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import tempfile
from typing import Any, Callable

import numpy as np

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix (a flag, a path, a missing download); shown as one line, no traceback."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run ``main`` and turn a ``UserError`` (or Ctrl-C) into a one-line message and a non-zero exit."""
    try:
        main()
    except UserError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message's formatting
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
        os.replace(tmp, path)  # atomic on POSIX and Windows when on the same filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file in the same folder, then an atomic rename."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
