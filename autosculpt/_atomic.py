"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``. A crash or
Ctrl-C never leaves a half-written checkpoint, cache or report under the final name."""
from __future__ import annotations

import os
import tempfile
import threading
from typing import Callable

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _atomic(path, suffix: str, write: Callable[[str], None]) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        # mkstemp creates the file 0600; the final file gets the mode any new file would (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~current_umask())
    except (AttributeError, OSError):  # pragma: no cover - no fchmod (Windows)
        pass
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, ".txt", write)


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    _atomic(path, ".pt", lambda tmp: torch.save(obj, tmp))
