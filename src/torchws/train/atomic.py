"""Atomic file writes: a temp file next to the target, fsync, ``os.replace``. Every file of a run dir that already
holds data (checkpoints, config.yaml, metrics.jsonl, summary.json, curves.png) is replaced this way, so a crash, a kill
or a failed write (disk full) at any moment leaves the old file or the new one, never a partial file. A process killed
mid-write (SIGKILL, a signal nobody handles, power loss) can leave the temp file ``.<name>.<pid>.<hex>.tmp`` behind;
``remove_stale_temp_files`` drops those when a run starts or resumes."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_link", "atomic_write", "atomic_write_text", "is_temp_file", "remove_stale_temp_files"]

# the temp names atomic_write makes: ".<target name>.<pid>.<8 hex digits>.tmp" (hidden, never a run file's name)
_TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # same dir: same file system


def is_temp_file(path: str | os.PathLike) -> bool:
    """True for the name of a temp file ``atomic_write`` makes (and removes, unless the process was killed)."""
    return _TEMP_NAME.fullmatch(Path(path).name) is not None


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a new temp file next to ``path``, fsync it, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    tmp = _temp_path(path)
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


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give the file ``source`` a second name ``path`` (replacing ``path`` atomically); where the file system has no
    hard links, ``path`` gets an atomically written copy."""
    source, path = Path(source), Path(path)
    if path.exists() and os.path.samefile(source, path):
        return  # already done (a run killed right after it); rename(2) onto the same file would leave tmp behind
    tmp = _temp_path(path)
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as f:
            atomic_write(path, lambda out: shutil.copyfileobj(f, out))
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed ``atomic_write`` left in ``folder`` (not its subfolders); returns them.

    Call it only while no other process writes into ``folder`` (a run dir belongs to one run at a time): a live
    write's temp file looks the same. Files of other names, e.g. a user's ``notes.tmp``, are left alone.
    """
    removed = []
    for path in sorted(Path(folder).iterdir()):
        if is_temp_file(path) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
