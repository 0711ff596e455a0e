"""Where datasets are looked for: explicit dir, $TORCHWS_DATA_DIR, system paths, the user cache."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import DatasetNotFoundError

DATA_DIR_ENV = "TORCHWS_DATA_DIR"


def cache_root() -> Path:
    """The user cache for torchws data: ``$XDG_CACHE_HOME/torchws`` or ``~/.cache/torchws``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torchws"


def candidate_dirs(data_dir: str | os.PathLike | None, subdir: str, system_dirs: Sequence[Path] = ()) -> list[Path]:
    """Directories to search, in priority order, without duplicates.

    Order: ``data_dir`` and ``data_dir/subdir``; ``$TORCHWS_DATA_DIR`` and ``$TORCHWS_DATA_DIR/subdir``;
    ``system_dirs`` (e.g. the Debian package's path); ``cache_root()/subdir``.
    """
    dirs: list[Path] = []
    for base in (data_dir, os.environ.get(DATA_DIR_ENV) or None):
        if base is not None:
            base = Path(base).expanduser()
            dirs += [base, base / subdir]
    dirs += [Path(d) for d in system_dirs]
    dirs.append(cache_root() / subdir)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_file(directory: Path, name: str, allow_gz: bool = False) -> Path | None:
    """``directory/name`` (or ``name.gz`` when ``allow_gz``) if it is a file, else None."""
    names = [name, name + ".gz"] if allow_gz else [name]
    for n in names:
        if (directory / n).is_file():
            return directory / n
    return None


def find_dataset_dir(
    dataset: str, candidates: Sequence[Path], required: Sequence[str], how_to_get: str, allow_gz: bool = False
) -> Path:
    """The first candidate directory holding every file in ``required``.

    Raises:
        DatasetNotFoundError: no candidate holds them all; the one-line message lists the candidates, what is missing
            in directories that hold only part of the set, and ``how_to_get``.
    """
    partial: list[str] = []
    for d in candidates:
        missing = [name for name in required if find_file(d, name, allow_gz) is None]
        if not missing:
            return d
        if len(missing) < len(required):
            partial.append(f"{d} lacks {', '.join(missing)}")
    names = [n + "[.gz]" for n in required] if allow_gz else list(required)
    looked = ", ".join(str(d) for d in candidates)
    detail = f" ({'; '.join(partial)})" if partial else ""
    raise DatasetNotFoundError(
        f"{dataset} not found: looked for {', '.join(names)} in {looked}{detail}. {how_to_get} "
        f"(pass data_dir or set ${DATA_DIR_ENV} to point at another place)."
    )
