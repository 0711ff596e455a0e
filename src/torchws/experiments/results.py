"""A sweep's results file: one JSON record per finished run, appended one whole line at a time.

Every record carries ``grid`` (the protocol's fingerprint), ``kind`` ("search" or "grid") and ``run_id``. A file
holds one protocol: records of two fingerprints are refused. A kill while a line is written leaves a torn last line
(no newline, not JSON): the report refuses such a file, the sweep drops the torn line (its run is recorded again from
its run dir) before appending. Nothing else is ever rewritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torchws.train.atomic import atomic_write_text

from .errors import ExperimentError

__all__ = ["REQUIRED_KEYS", "append_record", "read_results", "repair_torn_tail"]

REQUIRED_KEYS = ("grid", "kind", "run_id", "setup", "batch", "seed", "base_lr", "final_test_acc", "history")


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ExperimentError(f"{path}:{number}: not a JSON record ({line.strip()[:60]!r}); the file is damaged")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ExperimentError(f"{path}:{number}: not a sweep record (it lacks {', '.join(missing)})")
    return record


def _split_lines(path: Path) -> tuple[list[str], str | None]:
    """(complete lines, torn tail or None). A tail without a newline that parses is a complete record."""
    text = path.read_text()
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends in a newline
    if tail.strip():
        try:
            json.loads(tail)
            lines.append(tail)
            tail = ""
        except ValueError:
            pass
    return lines, (tail if tail.strip() else None)


def read_results(path: str | os.PathLike, *, allow_empty: bool = False) -> list[dict[str, Any]]:
    """All records of a results file, checked.

    Raises ExperimentError (naming the file and line) when the file is missing, empty (unless ``allow_empty``),
    ends in a torn line, holds a line that is not a record, or holds records of more than one grid.
    """
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"results file {path} does not exist (run `torchws sweep` first)")
    lines, tail = _split_lines(path)
    if tail is not None:
        raise ExperimentError(
            f"{path}:{len(lines) + 1}: the last line is truncated (a sweep was killed while writing "
            "it); rerun the same `torchws sweep` command to repair it and record that run again"
        )
    records = [_parse_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not records and not allow_empty:
        raise ExperimentError(f"results file {path} holds no records (is the sweep still on its first runs?)")
    grids = sorted({r["grid"] for r in records})
    if len(grids) > 1:
        first = next(n for n, r in enumerate(records, 1) if r["grid"] != records[0]["grid"])
        raise ExperimentError(f"{path} mixes grids {', '.join(grids)} (first record of another grid near line "
                              f"{first}); keep one grid's records per file")  # fmt: skip
    return records


def repair_torn_tail(path: str | os.PathLike) -> bool:
    """Drop a torn last line (atomically); True when one was dropped. The complete records stay byte for byte."""
    path = Path(path)
    if not path.is_file():
        return False
    lines, tail = _split_lines(path)
    if tail is None:
        return False
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return True


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as one line with a single write, then fsync (a kill leaves at most a torn last line)."""
    data = (json.dumps(record, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
