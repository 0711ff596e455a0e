"""The training loop: read it top to bottom in ``Trainer.run``; one epoch is ``Trainer._train_epoch``.

``train(config)`` works as a single process and under ``torchrun`` (DDP; rank 0 alone writes and prints). A run dir
holds ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``curves.png``, ``last.pt`` (each epoch, and when
``max_steps`` or a signal stops a run mid-epoch), older checkpoints (``--keep-checkpoints``) and ``best.pt`` (best
test accuracy). ``resume`` continues bit-for-bit in deterministic mode: the loaders are functions of (seed, epoch),
so restoring the epoch, the optimizer steps done in it, the weights, optimizer, schedule and RNG states is all it
takes. Which checkpoint a run resumes from, and whether it may write into its dir, is decided in ``rundir.py``; files
are replaced atomically (``atomic.py``), and temp files a killed write left behind are removed when a run starts.

SIGTERM (a scheduler, a preemption) and SIGINT (Ctrl-C) stop the run at the next optimizer-step boundary: the step
in progress finishes, ``last.pt`` is written and ``run`` raises ``RunTerminated`` (a SystemExit with status 143) or
``RunInterrupted`` (a KeyboardInterrupt; the CLI exits with 130). A signal during the last step of an epoch or during
evaluation lets that epoch end first (evaluation, epoch record, checkpoint). Under DDP the ranks agree on the stop
step (one tiny all-reduce per step), rank 0 alone writes, and every rank stops at the same step. The handlers and
the exceptions live in ``signals.py`` (re-exported here). A NaN or Inf loss or gradient is never applied
(``guard.py``, ``--nonfinite``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchws.data import TensorSplits
from torchws.fast import auto_enable

from . import checkpoint as ckpt
from .atomic import atomic_write_text, remove_stale_temp_files
from .config import TrainConfig, save_config
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, cleanup_distributed, init_distributed
from .errors import CheckpointError, ConfigError, NonFiniteError, RunDirError
from .guard import NonFiniteGuard, first_nonfinite_grad
from .inputs import Inputs, build_inputs, build_model
from .metrics import MetricsLogger, format_table
from .plots import plot_curves
from .progress import Progress
from .rundir import CheckpointWriter, check_out_dir, find_resume, remove_stale_files
from .schedule import LRSchedule, scaled_lr
from .signals import RunInterrupted, RunTerminated, StopSignals, stop_exception
from .step import StepStats, evaluate, train_step

__all__ = ["RunInterrupted", "RunTerminated", "evaluate", "train", "Trainer"]


def train(cfg: TrainConfig, *, splits: TensorSplits | None = None, echo: bool = True) -> dict[str, Any]:
    """Run training as configured; returns the summary (also written to ``out_dir/summary.json`` by rank 0).

    splits: in-memory data to train on instead of ``cfg.dataset`` (tests, the demo). echo: rank 0 prints progress.
    Raises TrainError subclasses (ConfigError, CheckpointError, RunDirError) and torchws.data's dataset errors for
    bad input, before anything is written; RunTerminated / RunInterrupted after SIGTERM / SIGINT saved ``last.pt``.
    """
    cfg.validate()
    try:
        info, device = init_distributed(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    finished = False
    try:
        summary = Trainer(cfg, info, device, splits, echo).run()
        finished = True
        return summary
    except (RunTerminated, RunInterrupted):
        finished = True  # every rank stopped at the same step and met at a barrier: no communication in flight
        raise
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise RunDirError(f"cannot write to --out-dir {cfg.out_dir}{where}: {e.strerror or e}; the files written "
                          "before are intact") from None  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)
        cleanup_distributed(info, synchronize=finished)


# a write into the run dir that failed: no permission, read-only or full file system, file too large
_WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.ENOTDIR}


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first use
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _enable_ws_pass(model: nn.Module, backend: str) -> None:
    """The model-level WS pass with the engine ``--ws-backend`` names, on the model's final device and layout: an
    engine that cannot run there is refused now, not at the first forward."""
    if backend == "off":
        return
    try:
        handle = auto_enable(model, backend=backend)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--ws-backend {backend}: {e}") from None
    if handle is not None:
        handle.warm_up()  # the engine's one-time set-up belongs to start-up, not to the first step's time


class Trainer:
    """State of one run; built by ``train``. Everything that can fail on user input happens in ``__init__``, before
    anything is written."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, splits: TensorSplits | None,
                 echo: bool) -> None:  # fmt: skip
        self.cfg, self.info, self.device = cfg, info, device
        self.echo = echo and info.is_main
        self.run_dir = Path(cfg.out_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"--out-dir {self.run_dir} is not a directory; pass a directory (new or holding a run)")
        _seed_everything(cfg.seed, cfg.deterministic)
        self.inputs: Inputs = build_inputs(cfg, info, device, splits)
        self.model = self._build_model()
        point = find_resume(cfg, self.run_dir, lambda state, path: ckpt.model_mismatch(self.model, state, path))
        self.point = check_out_dir(cfg, self.run_dir, point)
        self.steps_per_epoch = len(self.inputs.train) // cfg.accum_steps  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise ConfigError(f"--batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps} leaves no full step "
                              f"per epoch on {self.inputs.train_images} images")  # fmt: skip
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.total_batch = cfg.batch_size * cfg.accum_steps * info.world_size
        self.optimizer, self.schedule = self._build_optimizer()
        self.guard = NonFiniteGuard(cfg.nonfinite, cfg.max_skipped_steps)
        self.epoch, self.batch_in_epoch, self.step, self.best_acc = 0, 0, 0, -1.0
        self.history: list[dict[str, Any]] = []
        self.stop_signal: int | None = None  # SIGTERM / SIGINT once the ranks agreed to stop
        self.saved_step: int | None = None  # the step last.pt was written at by this run
        self.logger: MetricsLogger | None = None
        if self.point.state is not None:
            self._restore(self.point.state, self.point.path)  # type: ignore[arg-type]
        own_last = self.point.continues and self.point.path is not None and self.point.path.name == "last.pt"
        self.writer = CheckpointWriter(self.run_dir, cfg.keep_checkpoints, self.step if own_last else None)
        self.wrapped: nn.Module = self.model
        if info.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(cfg, self.inputs.num_classes, self.inputs.channels).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        _enable_ws_pass(model, cfg.ws_backend)
        return model

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, LRSchedule]:
        cfg = self.cfg
        peak = scaled_lr(cfg.lr, cfg.batch_size, cfg.accum_steps, self.info.world_size, cfg.base_batch) \
            if cfg.scale_lr else cfg.lr  # fmt: skip
        decay, no_decay = [], []  # none on 1-D params: our deviation from the paper (docs/training.md)
        for p in self.model.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.SGD(groups, lr=peak, momentum=cfg.momentum, nesterov=cfg.nesterov)
        schedule = LRSchedule(peak, self.total_steps, cfg.schedule, round(cfg.warmup_epochs * self.steps_per_epoch),
                              [m * self.steps_per_epoch for m in cfg.milestones], cfg.gamma)  # fmt: skip
        return optimizer, schedule

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        ckpt.restore_model(self.model, state, path)
        # load_state_dict also restores the saved hyperparameters; the current flags define the run on resume
        flags = [{k: g[k] for k in ("momentum", "weight_decay", "nesterov")} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this model ({e})") from None
        for group, values in zip(self.optimizer.param_groups, flags):
            group.update(values)
        self.schedule.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best_acc, self.history = state["best_acc"], list(state["history"])
        self.guard = NonFiniteGuard(self.cfg.nonfinite, self.cfg.max_skipped_steps, **state.get("nonfinite", {}))

    def _state(self) -> dict[str, Any]:
        return {"format": ckpt.FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "scaler": None, "rng": ckpt.capture_rng(),
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best_acc": self.best_acc, "history": self.history, "config": self.cfg.to_dict(),
                "world_size": self.info.world_size, "nonfinite": self.guard.state_dict()}  # fmt: skip

    def _print(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def _open_run_dir(self) -> MetricsLogger:
        """Rank 0, once the run is set up: the run dir, its config, and the metrics logger."""
        for note in self.point.notes:
            print(f"torchws: {note}", file=sys.stderr, flush=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.run_dir)  # left by a write that was killed
        if not self.point.continues:
            remove_stale_files(self.run_dir, keep=self.point.path)
        save_config(self.cfg, self.run_dir / "config.yaml")
        return MetricsLogger(self.run_dir, tensorboard=self.cfg.tensorboard,
                             truncate_after_step=self.step if self.point.continues else None)  # fmt: skip

    def run(self) -> dict[str, Any]:
        """The loop: epochs of optimizer steps, evaluation, checkpoints; returns the summary."""
        cfg = self.cfg
        if self.info.is_main:
            self.logger = self._open_run_dir()
        self._print(f"training {cfg.model} on {self.inputs.train_images} {cfg.dataset} images: {self.info.world_size}"
                    f" process(es) x {cfg.batch_size} x {cfg.accum_steps} accum = {self.total_batch} per step, "
                    f"peak lr {self.schedule.peak_lr:.4g}, {self.total_steps} steps")  # fmt: skip
        train_time, train_images = 0.0, 0
        with StopSignals(self.info, self.device) as signals:
            try:
                while self.epoch < cfg.epochs and self.step < self.total_steps:
                    self.stop_signal = signals.poll()  # one that came during evaluation or a checkpoint write
                    if self.stop_signal is not None:
                        break
                    record, seconds = self._train_epoch(signals)
                    train_time += seconds
                    train_images += record.pop("_images")
                    finished = self.batch_in_epoch == 0  # False when max_steps or a signal stopped the epoch early
                    last = self.step >= self.total_steps or self.epoch >= cfg.epochs
                    if self.stop_signal is None and (last or (finished and self.epoch % cfg.eval_every == 0)):
                        record["test_loss"], record["test_acc"] = evaluate(self.model, self.inputs.test,
                                                                           self.device, self.info, cfg.channels_last,
                                                                           cfg.bf16)  # fmt: skip
                    self._end_epoch(record)
                    if self.stop_signal is not None:
                        break
            finally:
                if self.logger is not None:
                    self.logger.close()
                shutdown = getattr(self.inputs.train, "shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
            if self.stop_signal is not None:
                self._stop(self.stop_signal)
            return self._finish(train_time, train_images)  # a signal after the last step: the run completes

    def _batches(self) -> Iterator[Any]:
        """The epoch's micro-batches from ``batch_in_epoch`` on: an image-folder loader starts past the done ones; the
        in-memory one replays them so that its random stream stays in step (cheap: index gathers)."""
        loader, done = self.inputs.train, self.batch_in_epoch * self.cfg.accum_steps
        loader.set_epoch(self.epoch)  # type: ignore[attr-defined]
        if done and hasattr(loader, "skip_batches"):
            loader.skip_batches(done)
            return iter(loader)  # type: ignore[call-overload]
        batches = iter(loader)  # type: ignore[call-overload]
        for _ in range(done):
            next(batches)
        return batches

    def _train_epoch(self, signals: StopSignals) -> tuple[dict[str, Any], float]:
        """Optimizer steps from ``batch_in_epoch`` to the end of the epoch (or ``max_steps``, or a signal)."""
        cfg, stats, batches = self.cfg, StepStats(), self._batches()
        end = min(self.steps_per_epoch, self.batch_in_epoch + self.total_steps - self.step)
        progress = Progress(end, self.batch_in_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}", cfg.log_every,
                            cfg.progress_seconds) if cfg.progress and self.echo else None  # fmt: skip
        self.model.train()
        start = time.perf_counter()
        for index in range(self.batch_in_epoch, end):
            lr = self._optimizer_step([next(batches) for _ in range(cfg.accum_steps)], stats, index)
            loss = stats.loss_sum / max(stats.images, 1)
            rate = stats.images * self.info.world_size / max(time.perf_counter() - start, 1e-9)
            if progress is not None:
                progress.update(loss, rate, lr)
            if self.logger is not None and self.step % cfg.log_every == 0:
                self.logger.log("train_step", step=self.step, epoch=self.epoch, lr=lr, loss=loss, images_per_s=rate)
            if index + 1 < end:  # after the epoch's last step, run() polls once the epoch has ended
                self.stop_signal = signals.poll()
                if self.stop_signal is not None:
                    break
        seconds = time.perf_counter() - start
        del batches  # the loader's workers end here
        if progress is not None:
            progress.close()
        return self._epoch_record(stats, seconds), seconds

    def _optimizer_step(self, micro: list[Any], stats: StepStats, index: int) -> float:
        """One optimizer step over ``micro``, applied only if its loss and gradients are finite; returns its lr."""
        previous_lr = [group["lr"] for group in self.optimizer.param_groups]
        lr = self.schedule.apply(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        step_stats = StepStats()
        train_step(self.model, self.wrapped, micro, step_stats, info=self.info, device=self.device, bf16=self.cfg.bf16,
                   channels_last=self.cfg.channels_last, ws_accumulate_once=self.cfg.ws_accumulate_once)  # fmt: skip
        bad = not NonFiniteGuard.is_finite(step_stats.loss_sum, self.model)
        if all_reduce_max(int(bad), self.info, self.device):  # every rank decides alike
            if self.guard.failed():
                self._stop_nonfinite(index, step_stats, previous_lr)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.guard.passed()
            stats.merge(step_stats)
        self.step += 1
        self.batch_in_epoch = index + 1
        return lr

    def _epoch_record(self, stats: StepStats, seconds: float) -> dict[str, Any]:
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        loss_sum, correct, images = all_reduce_sum([stats.loss_sum, stats.correct, stats.images], self.info,
                                                   self.device)  # fmt: skip
        epoch = self.epoch if self.batch_in_epoch == 0 else self.epoch + self.batch_in_epoch / self.steps_per_epoch
        return {"epoch": epoch, "step": self.step, "images_seen": self.step * self.total_batch,
                "lr": self.optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(images, 1),
                "train_acc": 100.0 * correct / max(images, 1), "images_per_s": images / max(seconds, 1e-9),
                "skipped_steps": self.guard.skipped, "_images": int(images)}  # fmt: skip

    def _end_epoch(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        is_best = record.get("test_acc") is not None and record["test_acc"] > self.best_acc
        if is_best:
            self.best_acc = record["test_acc"]
        test = f" | test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}%" if "test_acc" in record else ""
        self._print(f"epoch {record['epoch']:g}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%"
                    f"{test} | {record['images_per_s']:.0f} img/s")  # fmt: skip
        if not self.info.is_main:
            return
        if self.logger is not None:
            self.logger.log("epoch", **record)
        if self.cfg.save_checkpoints:
            self.writer.save(self._state(), best=is_best)
            self.saved_step = self.step

    def _stop_nonfinite(self, index: int, step_stats: StepStats, previous_lr: list[float]) -> None:
        """The step in progress had a NaN/Inf: write last.pt as of the step before, then raise NonFiniteError."""
        loss = step_stats.loss_sum / max(step_stats.images, 1)
        message = self.guard.message(self.step + 1, self.epoch, index + 1, loss, first_nonfinite_grad(self.model))
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step, self.batch_in_epoch = self.step, index  # the step is not done
        for group, lr in zip(self.optimizer.param_groups, previous_lr):
            group["lr"] = lr
        if self.logger is not None:
            self.logger.log("nonfinite", step=self.step + 1, epoch=self.epoch, loss=loss, stopped=True)
        if self.info.is_main and self.cfg.save_checkpoints:
            self.writer.save(self._state(), best=False)
        barrier(self.info)  # no rank exits before last.pt is complete
        raise NonFiniteError(message)

    def _stop(self, signum: int) -> None:
        """End a run that ``signum`` stopped at a step boundary: rank 0 makes sure last.pt holds this step and says
        how to continue; every rank waits for it, then raises RunTerminated (SIGTERM) or RunInterrupted (SIGINT)."""
        path = self.run_dir / "last.pt" if self.cfg.save_checkpoints else None
        if self.info.is_main and path is not None and self.saved_step != self.step:
            self.writer.save(self._state(), best=False)
            self.saved_step = self.step
        stopped = stop_exception(signum, self.step, self.total_steps, path)
        if self.echo:
            print(f"torchws: {stopped.message}", file=sys.stderr, flush=True)
        barrier(self.info)  # no rank exits before last.pt is complete (torchrun stops the rest when one exits)
        raise stopped

    def _finish(self, train_time: float, train_images: int) -> dict[str, Any]:
        final = next((r for r in reversed(self.history) if "test_acc" in r), {})
        summary = {"model": self.cfg.model, "dataset": self.cfg.dataset, "world_size": self.info.world_size,
                   "total_batch": self.total_batch, "peak_lr": self.schedule.peak_lr, "epochs": self.epoch,
                   "steps": self.step, "final_test_acc": final.get("test_acc"),
                   "final_test_loss": final.get("test_loss"),
                   "best_test_acc": self.best_acc if self.best_acc >= 0 else None, "train_time_s": train_time,
                   "images_per_s": train_images / train_time if train_time > 0 else None,
                   "skipped_steps": self.guard.skipped, "run_dir": str(self.run_dir),
                   "history": self.history}  # fmt: skip
        if self.info.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if self.cfg.plot:
                plot_curves({self.cfg.model: self.history}, self.run_dir / "curves.png", title=self.cfg.model)
            columns = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s"]
            self._print(format_table(self.history, columns))
        return summary
