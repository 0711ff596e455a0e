"""``torchws sweep``: run a grid (lr search first, then setups x batches x seeds), one ``torchws train`` process
per run, and append one JSON record per finished run to the results file.

Resume: runs already in the results file are skipped; a run dir left by a killed sweep continues from its
``last.pt`` (``--resume auto``), and a run that finished but was not recorded is recorded from its ``summary.json``.
Run dirs live under ``runs_dir/<grid fingerprint>/<run id>``. Parallelism: ``jobs`` processes with ``threads``
torch / OpenMP / numba threads each; ``jobs * threads`` may not exceed the CPUs this process may use.
SIGTERM / SIGINT stop the running trainers at a step boundary (they save ``last.pt``) and end the sweep.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import torchws
from torchws.train import TrainConfig, load_yaml, save_config

from .errors import ExperimentError
from .grid import BASE_BATCH, GridSpec, RunSpec, grid_runs
from .preflight import check_grid_fits
from .results import append_record, read_results, repair_torn_tail
from .selection import choose_base_lrs, search_accuracies, search_decision

__all__ = ["available_cpus", "run_config", "run_sweep", "threads_per_job"]

STOPPED = (143, 130, -signal.SIGTERM, -signal.SIGINT)  # a trainer stopped by the signal we forwarded


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_job(jobs: int, threads: int | None) -> int:
    """Threads for each of ``jobs`` processes: ``threads``, or the CPUs split evenly (at least 1); raises
    ExperimentError when ``jobs * threads`` would exceed the available CPUs."""
    cpus = available_cpus()
    if jobs < 1:
        raise ExperimentError(f"--jobs must be >= 1, got {jobs}")
    threads = max(1, cpus // jobs) if threads is None else threads
    if threads < 1 or jobs * threads > cpus:
        raise ExperimentError(f"--jobs {jobs} x --threads {threads} would oversubscribe the {cpus} CPU(s) available; "
                              f"use --jobs x --threads <= {cpus}")  # fmt: skip
    return threads


def _commit() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether src/ has uncommitted changes) of the checkout torchws is imported from, if any."""
    root = Path(torchws.__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head.stdout.strip(), bool(dirty.stdout.strip())


def run_config(spec: GridSpec, run: RunSpec, base_lr: float, run_dir: Path) -> TrainConfig:
    """The TrainConfig of one run of the grid (validated)."""
    return TrainConfig(
        model=spec.model(run.setup), dataset=spec.dataset, data_dir=spec.data_dir, image_size=spec.image_size,
        max_train_images=spec.train_images, max_eval_images=spec.eval_images, workers=0, batch_size=run.batch,
        epochs=spec.epochs, max_steps=spec.max_steps, lr=base_lr, base_batch=BASE_BATCH, momentum=spec.momentum,
        weight_decay=spec.weight_decay, schedule=spec.schedule, warmup_epochs=spec.warmup_epochs, seed=run.seed,
        device="cpu", out_dir=str(run_dir), resume="auto", progress=False, tensorboard=False, plot=False,
        log_every=10**9,
    ).validate()  # fmt: skip


class _Launcher:
    """Starts ``torchws train`` processes and stops them all on a signal."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[name] = str(self.threads)
        package_root = str(Path(torchws.__file__).resolve().parents[1])  # the children import this torchws
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        return env

    def run(self, config_path: Path, log_path: Path) -> int:
        command = [sys.executable, "-m", "torchws.train", "--config", str(config_path)]
        with open(log_path, "a") as log, self.lock:
            if self.stopping:
                return 143
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env())
            self.live.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.live.discard(process)

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            for process in self.live:
                process.send_signal(signal.SIGTERM)  # the trainer finishes its step and saves last.pt


def _slim_history(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("epoch", "step", "images_seen", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
    return [{k: h[k] for k in keys if k in h} for h in history]


def _record(spec: GridSpec, run: RunSpec, base_lr: float, cfg: TrainConfig, summary: dict[str, Any], wall: float,
            context: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    history = summary["history"]
    return {
        "grid": spec.fingerprint(), "grid_name": spec.name, "kind": run.kind, "run_id": run.run_id,
        "setup": run.setup, "model": cfg.model, "batch": run.batch, "seed": run.seed, "base_lr": base_lr,
        "peak_lr": summary["peak_lr"], "epochs": summary["epochs"], "steps": summary["steps"],
        "final_test_acc": summary["final_test_acc"], "best_test_acc": summary["best_test_acc"],
        "final_test_loss": summary["final_test_loss"],
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "train_time_s": summary["train_time_s"], "wall_s": wall, "images_per_s": summary["images_per_s"],
        "history": _slim_history(history), "plan": {"setups": list(spec.setups), "batches": list(spec.batches),
                                                    "seeds": list(spec.seeds)},
        "protocol": spec.protocol(), "config": cfg.to_dict(), **context,
    }  # fmt: skip


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # written atomically, so only a foreign file gets here: run again over it via --resume auto


def _check_same_run(config_path: Path, cfg: TrainConfig) -> None:
    """A run dir left by an earlier sweep must hold this very run (the lr is what could differ: a setup's searched lr
    changes only if its search runs were redone with other results)."""
    saved_lr = load_yaml(config_path, saved=True).get("lr") if config_path.exists() else cfg.lr
    if saved_lr != cfg.lr:
        raise ExperimentError(f"{config_path.parent} holds a run with base lr {saved_lr}, but "
                              f"the search now gives {cfg.lr}; move that run dir away to train it again")  # fmt: skip


def _execute(spec: GridSpec, run: RunSpec, base_lr: float, runs_dir: Path, launcher: _Launcher,
             context: dict[str, Any]) -> dict[str, Any] | int:  # fmt: skip
    """Train one run (or pick up its finished summary); returns its record, or the trainer's exit code."""
    run_dir = runs_dir / spec.fingerprint() / run.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config(spec, run, base_lr, run_dir)
    config_path = run_dir / "sweep_run.yaml"
    _check_same_run(config_path, cfg)
    summary, wall = _read_summary(run_dir), 0.0  # written when a run completes: a finished, unrecorded run
    if summary is None:
        save_config(cfg, config_path)
        start = time.perf_counter()
        code = launcher.run(config_path, run_dir / "train.log")
        wall = time.perf_counter() - start
        summary = _read_summary(run_dir) if code == 0 else None
        if summary is None:
            return code if code != 0 else 1
    record = _record(spec, run, base_lr, cfg, summary, wall, {k: v for k, v in context.items() if k != "parameters"})
    record["parameters"] = context["parameters"][run.setup]  # of this setup's model on this dataset
    return record


def _run_batch(runs: list[tuple[RunSpec, float]], spec: GridSpec, paths: tuple[Path, Path], jobs: int,
               launcher: _Launcher, context: dict[str, Any], say: Callable[[str], None]) -> list[str]:  # fmt: skip
    """Run ``runs`` on ``jobs`` workers, appending each record as it finishes; returns the failures."""
    results_path, runs_dir = paths
    failures, done, lock, start = [], [0], threading.Lock(), time.perf_counter()

    def work(item: tuple[RunSpec, float]) -> None:
        run, lr = item
        outcome = _execute(spec, run, lr, runs_dir, launcher, context)
        with lock:
            if isinstance(outcome, int):
                if outcome not in STOPPED:
                    failures.append(f"{run.run_id} (exit {outcome}; log: {runs_dir / spec.fingerprint() / run.run_id}"
                                    "/train.log)")  # fmt: skip
                return
            append_record(results_path, outcome)
            done[0] += 1
            rate = (time.perf_counter() - start) / done[0]
            say(
                f"[{done[0]}/{len(runs)}] {run.run_id}: test acc {outcome['final_test_acc']:.2f}%, "
                f"{outcome['wall_s']:.0f} s; about {rate * (len(runs) - done[0]) / 60:.0f} min left in this phase"
            )

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(work, item) for item in runs]
    try:
        pending = set(futures)
        while pending:  # wake up often: a signal delivered to a worker thread is only handled when main wakes
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            for future in finished:
                future.result()
    except BaseException:  # a signal or an error: stop the trainers now rather than after their whole runs
        launcher.stop_all()
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
    return failures


def _search(spec: GridSpec, paths: tuple[Path, Path], jobs: int, launcher: _Launcher, context: dict[str, Any],
            say: Callable[[str], None]) -> list[str]:  # fmt: skip
    """Run the lr search in rounds until every setup's decision is made (or a round adds nothing: failures)."""
    failures: list[str] = []
    while True:
        records = _recorded(paths[0])
        needed = [RunSpec("search", setup, spec.search_batch, spec.search_seed, lr) for setup in spec.setups
                  for lr in search_decision(search_accuracies(records, spec, setup), spec)[1]]  # fmt: skip
        todo = _pending(needed, records)
        if not todo or failures:
            return failures
        say(f"grid {spec.name} ({spec.fingerprint()}): {len(todo)} lr-search runs to do, {launcher.threads} thread(s)"
            f" x {jobs} process(es)")  # fmt: skip
        failures += _run_batch([(r, r.base_lr) for r in todo], spec, paths, jobs, launcher, context, say)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwinds _run_batch, which stops the trainers (they save last.pt)


def _recorded(path: Path) -> list[dict[str, Any]]:
    return read_results(path, allow_empty=True) if path.exists() else []


def _pending(runs: list[RunSpec], records: list[dict[str, Any]]) -> list[RunSpec]:
    done = {r["run_id"] for r in records}
    return [r for r in runs if r.run_id not in done]


def _load_existing(results_path: Path, spec: GridSpec, say: Callable[[str], None]) -> list[dict[str, Any]]:
    if results_path.exists() and repair_torn_tail(results_path):
        say(f"dropped a torn last line of {results_path} (its run is recorded again)")
    if not results_path.exists():
        return []
    records = read_results(results_path, allow_empty=True)
    if records and records[0]["grid"] != spec.fingerprint():
        raise ExperimentError(f"{results_path} holds results of another protocol (grid {records[0]['grid']}, this "
                              f"sweep is {spec.fingerprint()}); pass another --results file")  # fmt: skip
    return records


@contextmanager
def _only_writer(results_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<results name>.lock`` next to the results file for the whole sweep: two sweeps
    appending to one file would run and record the same runs twice."""
    lock_path = results_path.with_name(f".{results_path.name}.lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExperimentError(f"another sweep is writing {results_path} (it holds {lock_path}); wait for it or "
                                  "stop it first") from None  # fmt: skip
        yield


def run_sweep(spec: GridSpec, results_path: str | os.PathLike, runs_dir: str | os.PathLike, *, jobs: int = 1,
              threads: int | None = None, command: str | None = None, echo: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run every pending run of ``spec``; returns counts. Raises ExperimentError on bad input before any run starts
    (and ExperimentError after the runs when some failed: they are named, the finished ones are recorded)."""
    say = (lambda text: print(text, flush=True)) if echo else (lambda text: None)
    threads = threads_per_job(jobs, threads)
    parameters = check_grid_fits(spec)
    results_path, runs_dir = Path(results_path), Path(runs_dir)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with _only_writer(results_path):
        _load_existing(results_path, spec, say)
        return _sweep_locked(spec, results_path, runs_dir, jobs, threads, parameters, command, say)


def _sweep_locked(spec: GridSpec, results_path: Path, runs_dir: Path, jobs: int, threads: int,
                  parameters: dict[str, int], command: str | None,
                  say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """The sweep proper: the lr search, then the grid (the caller holds the results file's lock)."""
    commit, dirty = _commit()
    context = {"commit": commit, "dirty": dirty, "threads": threads, "jobs": jobs, "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.machine(),
               "command": command or "torchws " + " ".join(map(shlex.quote, sys.argv[1:])),
               "parameters": parameters}  # fmt: skip
    launcher, paths = _Launcher(threads), (results_path, runs_dir)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        failures = _search(spec, paths, jobs, launcher, context, say)
        records = _recorded(results_path)
        lrs = choose_base_lrs(records, spec)
        missing = [s for s in spec.setups if s not in lrs]
        grid = [r for r in _pending(grid_runs(spec), records) if r.setup in lrs]
        say(f"base lrs at {BASE_BATCH}: {lrs}; {len(grid)} grid runs to do")
        failures += _run_batch([(r, lrs[r.setup]) for r in grid], spec, paths, jobs, launcher, context, say)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failures or missing:
        raise ExperimentError(
            f"{len(failures)} run(s) failed: {'; '.join(failures) or 'none'}; setups without a "
            f"searched lr: {', '.join(missing) or 'none'}; the finished runs are in {results_path}"
        )
    return {"results": str(results_path), "records": len(_recorded(results_path))}
