"""Atomic file writes: a temp file next to the target, fsync, ``os.replace``. Every file of a run dir that already
holds data (checkpoints, config.yaml, metrics.jsonl, summary.json, curves.png) is replaced this way, so a crash, a kill
or a failed write (disk full) at any moment leaves the old file or the new one, never a partial file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a new temp file next to ``path``, fsync it, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # same dir: same file system
    try:
        # os.open honours the umask (mkstemp would make every run file private to its owner)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(text.encode()))
