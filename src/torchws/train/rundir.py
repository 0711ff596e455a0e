"""A run dir across kills and requeues: which checkpoint a run resumes from, whether it may write into its
``--out-dir``, and how checkpoints are written and kept.

``--resume auto`` is what a scheduler relaunches after a kill, at any moment. It continues from ``last.pt``; when
``last.pt`` is damaged (truncated, corrupt, not a torchws checkpoint, or of another model) it says so on stderr and
continues from the newest valid checkpoint the dir keeps (``checkpoint-step<N>.pt``, ``best.pt``); a run killed
before its first checkpoint starts afresh when the dir holds nothing but its own ``config.yaml`` and records.
A run that does not continue the dir's own checkpoints refuses a dir holding another run's results unless
``--overwrite`` (then it removes them). Checkpoints are written atomically; the ``--keep-checkpoints N`` newest stay
(``last.pt`` and N - 1 older ones, hard links of the files ``last.pt`` was before, so keeping them costs no write).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .atomic import atomic_link
from .config import TrainConfig, load_yaml
from .errors import CheckpointError, ConfigError, RunDirError

__all__ = ["CheckpointWriter", "ResumePoint", "RUN_FILES", "check_out_dir", "find_resume", "kept_checkpoints"]

# the files that hold a run's results; config.yaml and an empty metrics.jsonl alone are what a run that failed before
# its first record leaves (e.g. out of memory at the first step), and a new run may replace them
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "curves.png")
STALE_ON_OVERWRITE = ("last.pt", "best.pt", "summary.json", "curves.png")  # the rest is rewritten at the start
_KEPT = re.compile(r"checkpoint-step(\d+)\.pt")
# flags that may differ between a killed run and its requeue without making it another run
_NOT_THE_RUN = ("resume", "overwrite", "threads", "progress", "progress_seconds")


def kept_checkpoints(run_dir: Path) -> dict[int, Path]:
    """The older checkpoints a run dir keeps, by step."""
    if not run_dir.is_dir():
        return {}
    found = {}
    for path in run_dir.iterdir():
        match = _KEPT.fullmatch(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


@dataclass
class ResumePoint:
    """Where a run starts. ``state`` / ``path``: the checkpoint (None: from scratch). ``continues``: the run goes on
    in its own dir (its records past ``state``'s step are dropped); False: a new run in the dir. ``notes``: what was
    passed over and why (damaged checkpoints), one line each, for stderr."""

    state: dict[str, Any] | None = None
    path: Path | None = None
    continues: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return 0 if self.state is None else int(self.state["step"])


def _load_fitting(path: Path, fits: Callable[[dict[str, Any], Path], str | None]) -> dict[str, Any]:
    state = ckpt.load_checkpoint(path)
    problem = fits(state, path)
    if problem is not None:
        raise CheckpointError(problem)
    return state


def _auto_resume(run_dir: Path, fits: Callable[[dict[str, Any], Path], str | None]) -> ResumePoint:
    """``--resume auto``: last.pt if it is valid, else the newest valid checkpoint the dir keeps."""
    last = run_dir / "last.pt"
    candidates = [*reversed(kept_checkpoints(run_dir).values()), run_dir / "best.pt"]
    if not last.exists() and not any(path.exists() for path in candidates):
        return ResumePoint()
    notes: list[str] = []
    if last.exists():
        try:
            return ResumePoint(_load_fitting(last, fits), last, continues=True)
        except CheckpointError as e:
            notes.append(f"{e}; looking for an older checkpoint in {run_dir}")
    valid: list[tuple[int, Path, dict[str, Any]]] = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = _load_fitting(path, fits)
        except CheckpointError as e:
            notes.append(str(e))
            continue
        valid.append((int(state["step"]), path, state))
    if not valid:
        raise CheckpointError(f"--resume auto: no usable checkpoint in {run_dir}: " + "; ".join(notes))
    step, path, state = max(valid, key=lambda item: item[0])  # max keeps the first of equal steps (kept ones)
    notes.append(f"resuming from {path} (step {step}), the newest valid checkpoint")
    return ResumePoint(state, path, continues=True, notes=notes)


def find_resume(cfg: TrainConfig, run_dir: Path, fits: Callable[[dict[str, Any], Path], str | None]) -> ResumePoint:
    """The checkpoint ``cfg.resume`` names. ``fits(state, path)`` returns why a checkpoint does not fit the model (or
    None). Raises CheckpointError for an unusable ``--resume PATH`` or when no checkpoint of the dir is usable, and
    RunDirError when ``--out-dir`` is not a directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out-dir {run_dir} is not a directory; pass a directory (new or holding a run)")
    if cfg.resume is None:
        return ResumePoint()
    if cfg.resume == "auto":
        return _auto_resume(run_dir, fits)
    path = Path(cfg.resume)
    state = ckpt.load_checkpoint(path)
    problem = fits(state, path)
    if problem is not None:
        raise CheckpointError(problem)
    own = [run_dir / "last.pt", *kept_checkpoints(run_dir).values()]
    continues = any(p.exists() and os.path.samefile(path, p) for p in own)
    return ResumePoint(state, path, continues=continues)


def _killed_before_first_checkpoint(cfg: TrainConfig, run_dir: Path, existing: list[str]) -> bool:
    """True when the dir holds only what this very run (same config) writes before its first checkpoint."""
    if cfg.resume != "auto" or existing != ["metrics.jsonl"] or kept_checkpoints(run_dir):
        return False
    try:
        path = run_dir / "config.yaml"
        saved = TrainConfig.from_dict(load_yaml(path, saved=True), str(path)).to_dict()
    except ConfigError:
        return False
    now = cfg.to_dict()
    return all(saved.get(k) == now[k] for k in now if k not in _NOT_THE_RUN)


def check_out_dir(cfg: TrainConfig, run_dir: Path, point: ResumePoint) -> ResumePoint:
    """Decide whether the run may write into ``run_dir``; returns ``point``, marked as continuing when the run
    restarts one killed before its first checkpoint. Raises RunDirError when a new run would replace another one's
    results without ``--overwrite``."""
    if point.continues:
        return point
    names = [name for name in RUN_FILES if (run_dir / name).exists() and (run_dir / name).stat().st_size > 0]
    existing = names + [p.name for p in kept_checkpoints(run_dir).values()]
    if not existing or cfg.overwrite:
        return point
    if point.path is None and _killed_before_first_checkpoint(cfg, run_dir, existing):
        point.continues = True
        point.notes.append(f"{run_dir} holds records but no checkpoint of this run: it restarts from step 0")
        return point
    held = f"--out-dir {run_dir} already holds {', '.join(existing)}"
    if point.path is not None:
        raise RunDirError(f"{held} of a run that --resume {point.path} would overwrite; continue that run with "
                          "--resume auto, pass --overwrite to replace it, or choose another --out-dir")  # fmt: skip
    resume = "pass --resume auto to continue that run, " if "last.pt" in existing else ""
    raise RunDirError(f"{held}; {resume}pass --overwrite to replace it, or choose another --out-dir")


def remove_stale_files(run_dir: Path, keep: Path | None) -> None:
    """A new run in a dir that held another one (--overwrite): drop that run's checkpoints and results, so none is
    mistaken for this run's (best.pt is only rewritten on a new best; --resume auto would pick up last.pt). ``keep``:
    the checkpoint the run starts from, which stays."""
    for path in [*(run_dir / name for name in STALE_ON_OVERWRITE), *kept_checkpoints(run_dir).values()]:
        if path.exists() and not (keep is not None and keep.exists() and os.path.samefile(path, keep)):
            path.unlink()


class CheckpointWriter:
    """Writes ``best.pt`` and ``last.pt`` atomically and keeps the ``keep`` newest checkpoints.

    ``last_step``: the step of the ``last.pt`` in the dir (None when there is none, or when it is damaged and must
    not be kept). Before ``last.pt`` is replaced, the file it was gets the name ``checkpoint-step<N>.pt`` (a hard
    link: no copy); the kept files beyond ``keep - 1``, and those at or past the new step (a killed run's future),
    are removed after the new ``last.pt`` is in place.
    """

    def __init__(self, run_dir: Path, keep: int, last_step: int | None) -> None:
        self.run_dir, self.keep, self.last_step = run_dir, keep, last_step

    def save(self, state: dict[str, Any], *, best: bool) -> None:
        step = int(state["step"])
        last = self.run_dir / "last.pt"
        if best:  # before last.pt: a kill in between must not leave a best_acc whose model is nowhere
            ckpt.save_checkpoint(state, self.run_dir / "best.pt")
        if self.keep > 1 and self.last_step is not None and self.last_step != step and last.exists():
            atomic_link(last, self.run_dir / f"checkpoint-step{self.last_step:07d}.pt")
        ckpt.save_checkpoint(state, last)
        self.last_step = step
        kept = kept_checkpoints(self.run_dir)
        older = [s for s in kept if s < step]
        retained = set(older[max(0, len(older) - (self.keep - 1)) :])
        for s, path in kept.items():
            if s not in retained:
                path.unlink(missing_ok=True)
