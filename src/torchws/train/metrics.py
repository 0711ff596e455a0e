"""Metrics as JSON lines (one record per line, ``kind`` says which), optional TensorBoard, and text tables."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

__all__ = ["MetricsLogger", "format_table", "read_metrics"]


class MetricsLogger:
    """Append records to ``<run_dir>/metrics.jsonl``; mirror numbers to TensorBoard when asked and installed.

    Only rank 0 should create one. ``truncate_after_step``: on resume, drop records of steps past the checkpoint so
    the file reads as one uninterrupted run (rewritten atomically; a half-written last line left by a kill is dropped,
    any other line the trainer cannot parse is kept as it is; TensorBoard's events past it are purged). None: start
    an empty file.
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, tensorboard: bool = False, truncate_after_step: int | None = None
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if truncate_after_step is None:
            self.path.write_text("")
        elif self.path.exists():
            atomic_write_text(self.path, "".join(_lines_up_to_step(self.path, truncate_after_step)))
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on resume, TensorBoard hides the killed run's events past the checkpoint (as the JSON lines drop)
                purge = None if truncate_after_step is None else truncate_after_step + 1
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is optional: JSON lines are the record
                self._tb = None

    def log(self, kind: str, **values: Any) -> None:
        """Write one record ``{"kind": kind, **values}`` (and its numbers to TensorBoard under ``kind/``)."""
        record = {"kind": kind, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in values:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, values["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _lines_up_to_step(path: Path, step: int) -> list[str]:
    """The lines of ``path`` to keep on resume at ``step``, each ending in a newline."""
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n") and _parse(lines[-1]) is None:
        lines.pop()  # torn by a kill mid-write: a record of a step after the checkpoint
    kept = []
    for line in lines:
        record = _parse(line)
        if record is None or record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (only those of ``kind`` if given).

    A half-written last line (a run killed, or still writing) is skipped; any other line that is not a JSON record
    raises ValueError naming ``path:line``.
    """
    lines = Path(path).read_text().splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not a JSON record: {line.strip()[:80]!r}")
        records.append(record)
    return [r for r in records if kind is None or r.get("kind") == kind]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts), one column per key of the first row unless ``columns`` is given."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]  # numbers right, text left
    body = ["| " + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)) + " |"
            for row in cells]  # fmt: skip
    return "\n".join([line, rule, *body])
