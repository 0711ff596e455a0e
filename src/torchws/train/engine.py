"""The training loop: read it top to bottom in ``Trainer.run``.

``train(config)`` works as a single process and under ``torchrun`` (DDP; rank 0 alone writes and prints). A run dir
holds ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``curves.png``, ``last.pt`` (each epoch, and when
``max_steps`` stops a run mid-epoch) and ``best.pt`` (best test accuracy). ``resume`` continues bit-for-bit in
deterministic mode: the loaders are functions of (seed, epoch), so restoring the epoch, the optimizer steps done in
it, the weights, optimizer, schedule and RNG states is all it takes. A run that does not continue the dir's own
``last.pt`` refuses a dir holding another run's results unless ``overwrite`` (then it removes them); files are
replaced atomically (``atomic.py``), and temp files a killed write left behind are removed when a run starts.

SIGTERM (a scheduler, a preemption) and SIGINT (Ctrl-C) stop the run at the next optimizer-step boundary: the step
in progress finishes, ``last.pt`` is written and ``run`` raises ``RunTerminated`` (a SystemExit with status 143) or
``RunInterrupted`` (a KeyboardInterrupt; the CLI exits with 130). A signal during the last step of an epoch or during
evaluation lets that epoch end first (evaluation, epoch record, checkpoint). Under DDP the ranks agree on the stop
step (one tiny all-reduce per step), rank 0 alone writes, and every rank stops at the same step. The handlers and
the exceptions live in ``signals.py`` (re-exported here).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from torchws.data import TensorSplits
from torchws.fast import auto_enable

from . import checkpoint as ckpt
from .atomic import atomic_write_text, remove_stale_temp_files
from .config import TrainConfig, save_config
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, init_distributed
from .errors import CheckpointError, ConfigError, RunDirError
from .inputs import Inputs, build_inputs, build_model
from .metrics import MetricsLogger, format_table
from .plots import plot_curves
from .schedule import LRSchedule, scaled_lr
from .signals import RunInterrupted, RunTerminated, StopSignals, stop_exception
from .step import StepStats, train_step

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
    previous = torch.are_deterministic_algorithms_enabled()
    finished = False
    try:
        summary = Trainer(cfg, info, device, splits, echo).run()
        finished = True
        return summary
    except (RunTerminated, RunInterrupted):
        finished = True  # every rank stopped at the same step and met at a barrier: no communication in flight
        raise
    finally:
        torch.use_deterministic_algorithms(previous)
        cleanup_distributed(info, synchronize=finished)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, device: torch.device, info: DistInfo, channels_last: bool = False,
             bf16: bool = False) -> tuple[float, float]:  # fmt: skip
    """(mean cross-entropy, top-1 accuracy in %) over all ranks' shards of the test set."""
    if info.enabled:  # BN running stats drift per rank in training: evaluate rank 0's (the saved) model everywhere
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images).float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += labels.shape[0]
    model.train(was_training)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], info, device)
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first use
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# the files that hold a run's results; config.yaml and an empty metrics.jsonl alone are what a run that failed before
# its first record leaves (e.g. out of memory at the first step), and a new run may replace them
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "curves.png")
STALE_ON_OVERWRITE = ("last.pt", "best.pt", "summary.json", "curves.png")  # the rest is rewritten at the start


def _resume_source(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint named by ``--resume`` (None: a fresh run; ``auto`` without ``last.pt`` is one too)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out-dir {run_dir} is not a directory; pass a directory (new or holding a run)")
    if cfg.resume == "auto":
        last = run_dir / "last.pt"
        return last if last.exists() else None
    return None if cfg.resume is None else Path(cfg.resume)


def _continues_run(cfg: TrainConfig, run_dir: Path, source: Path | None) -> bool:
    """True when ``source`` is ``run_dir``'s own last.pt (the run goes on). Otherwise this is a new run in
    ``run_dir``: refuse, unless ``--overwrite``, when the dir already holds files of a run."""
    last = run_dir / "last.pt"
    if source is not None and last.exists() and os.path.samefile(source, last):
        return True
    existing = [name for name in RUN_FILES if (run_dir / name).exists() and (run_dir / name).stat().st_size > 0]
    if not existing or cfg.overwrite:
        return False
    held = f"--out-dir {run_dir} already holds {', '.join(existing)}"
    if source is not None:
        raise RunDirError(f"{held} of a run that --resume {source} would overwrite; continue that run with --resume "
                          "auto, pass --overwrite to replace it, or choose another --out-dir")  # fmt: skip
    resume = "pass --resume auto to continue that run, " if "last.pt" in existing else ""
    raise RunDirError(f"{held}; {resume}pass --overwrite to replace it, or choose another --out-dir")


def _enable_ws_pass(model: nn.Module, backend: str) -> None:
    """The model-level WS pass with the engine ``--ws-backend`` names, on the model's final device and layout: an
    engine that cannot run there is refused now, not at the first forward."""
    if backend == "off":
        return
    try:
        auto_enable(model, backend=backend)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--ws-backend {backend}: {e}") from None


class Trainer:
    """State of one run; built by ``train``. Everything that can fail on user input happens in ``__init__``."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, splits: TensorSplits | None,
                 echo: bool) -> None:  # fmt: skip
        self.cfg, self.info, self.device = cfg, info, device
        self.echo = echo and info.is_main
        self.run_dir = Path(cfg.out_dir)
        resume = _resume_source(cfg, self.run_dir)
        state = ckpt.load_checkpoint(resume) if resume is not None else None
        self.resume_source = resume
        self.continues = _continues_run(cfg, self.run_dir, resume)
        _seed_everything(cfg.seed, cfg.deterministic)
        self.inputs: Inputs = build_inputs(cfg, info, device, splits)
        self.model = build_model(cfg, self.inputs.num_classes, self.inputs.channels).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        _enable_ws_pass(self.model, cfg.ws_backend)
        self.steps_per_epoch = len(self.inputs.train) // cfg.accum_steps  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise ConfigError(f"--batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps} leaves no full step "
                              f"per epoch on {self.inputs.train_images} images")  # fmt: skip
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.total_batch = cfg.batch_size * cfg.accum_steps * info.world_size
        peak = scaled_lr(cfg.lr, cfg.batch_size, cfg.accum_steps, info.world_size, cfg.base_batch) if cfg.scale_lr \
            else cfg.lr  # fmt: skip
        decay, no_decay = [], []  # none on 1-D params: our deviation from the paper (docs/training.md)
        for p in self.model.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.SGD(groups, lr=peak, momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.schedule = LRSchedule(peak, self.total_steps, cfg.schedule,
                                   round(cfg.warmup_epochs * self.steps_per_epoch),
                                   [m * self.steps_per_epoch for m in cfg.milestones], cfg.gamma)  # fmt: skip
        self.epoch, self.batch_in_epoch, self.step, self.best_acc = 0, 0, 0, -1.0
        self.history: list[dict[str, Any]] = []
        self.stop_signal: int | None = None  # SIGTERM / SIGINT once the ranks agreed to stop
        self.saved_step: int | None = None  # the step last.pt was written at by this run
        if state is not None:
            self._restore(state, resume)  # type: ignore[arg-type]
        self.wrapped: nn.Module = self.model
        if info.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        saved = state.get("config", {}).get("model", "?")
        ckpt.restore_model(self.model, state["model"], path, saved)
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

    def _state(self) -> dict[str, Any]:
        return {"format": ckpt.FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "scaler": None, "rng": ckpt.capture_rng(),
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best_acc": self.best_acc, "history": self.history, "config": self.cfg.to_dict(),
                "world_size": self.info.world_size}  # fmt: skip

    def _print(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def run(self) -> dict[str, Any]:
        """The loop: epochs of optimizer steps, evaluation, checkpoints; returns the summary."""
        cfg, main = self.cfg, self.info.is_main
        logger = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)  # left by a write that was killed
            if not self.continues:
                self._remove_stale_files()
            save_config(cfg, self.run_dir / "config.yaml")
            logger = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard,
                                   truncate_after_step=self.step if self.continues else None)  # fmt: skip
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
                    record, seconds = self._train_epoch(logger, signals)
                    train_time += seconds
                    train_images += record.pop("_images")
                    finished = self.batch_in_epoch == 0  # False when max_steps or a signal stopped the epoch early
                    last = self.step >= self.total_steps or self.epoch >= cfg.epochs
                    if self.stop_signal is None and (last or (finished and self.epoch % cfg.eval_every == 0)):
                        record["test_loss"], record["test_acc"] = evaluate(self.model, self.inputs.test,
                                                                           self.device, self.info, cfg.channels_last,
                                                                           cfg.bf16)  # fmt: skip
                    self._end_epoch(record, logger)
                    if self.stop_signal is not None:
                        break
            finally:
                if logger is not None:
                    logger.close()
            if self.stop_signal is not None:
                self._stop(self.stop_signal)
            return self._finish(train_time, train_images)  # a signal after the last step: the run completes

    def _remove_stale_files(self) -> None:
        """A new run in a dir that held another one (--overwrite): drop that run's checkpoints and results, so none
        is mistaken for this run's (best.pt is only rewritten on a new best; --resume auto would pick up last.pt)."""
        for name in STALE_ON_OVERWRITE:
            path = self.run_dir / name
            if path.exists() and not (self.resume_source is not None and os.path.samefile(path, self.resume_source)):
                path.unlink()

    def _train_epoch(self, logger: MetricsLogger | None, signals: StopSignals) -> tuple[dict[str, Any], float]:
        cfg, loader = self.cfg, self.inputs.train
        loader.set_epoch(self.epoch)  # type: ignore[attr-defined]
        skip, stats = self.batch_in_epoch, StepStats()
        # resumed mid-epoch: an image-folder loader starts past the done batches; the in-memory one is replayed so
        # its random stream stays in step (cheap: index gathers)
        skips_itself = skip > 0 and hasattr(loader, "skip_batches")
        if skips_itself:
            loader.skip_batches(skip * cfg.accum_steps)  # type: ignore[attr-defined]
        batches = iter(loader)  # type: ignore[call-overload]
        end = min(self.steps_per_epoch, skip + self.total_steps - self.step)
        bar = _progress(cfg.progress and self.echo, end, skip, f"epoch {self.epoch + 1}/{cfg.epochs}")
        self.model.train()
        start = time.perf_counter()
        for index in range(end):
            if index < skip:
                if not skips_itself:
                    for _ in range(cfg.accum_steps):
                        next(batches)
                continue
            micro = [next(batches) for _ in range(cfg.accum_steps)]
            lr = self.schedule.apply(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            train_step(self.model, self.wrapped, micro, stats, info=self.info, device=self.device, bf16=cfg.bf16,
                       channels_last=cfg.channels_last, ws_accumulate_once=cfg.ws_accumulate_once)  # fmt: skip
            self.optimizer.step()
            self.step += 1
            self.batch_in_epoch = index + 1
            rate = stats.images * self.info.world_size / max(time.perf_counter() - start, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{stats.loss_sum / stats.images:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
                bar.update(1)
            if logger is not None and self.step % cfg.log_every == 0:
                logger.log("train_step", step=self.step, epoch=self.epoch, lr=lr,
                           loss=stats.loss_sum / stats.images, images_per_s=rate)  # fmt: skip
            if index + 1 < end:  # after the epoch's last step, run() polls once the epoch has ended
                self.stop_signal = signals.poll()
                if self.stop_signal is not None:
                    break
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        loss_sum, correct, images = all_reduce_sum([stats.loss_sum, stats.correct, stats.images], self.info,
                                                   self.device)  # fmt: skip
        record = {"epoch": self.epoch if self.batch_in_epoch == 0 else self.epoch + self.batch_in_epoch /
                  self.steps_per_epoch, "step": self.step, "images_seen": self.step * self.total_batch,
                  "lr": self.optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(images, 1),
                  "train_acc": 100.0 * correct / max(images, 1), "images_per_s": images / max(seconds, 1e-9),
                  "_images": int(images)}  # fmt: skip
        return record, seconds

    def _end_epoch(self, record: dict[str, Any], logger: MetricsLogger | None) -> None:
        self.history.append(record)
        is_best = record.get("test_acc") is not None and record["test_acc"] > self.best_acc
        if is_best:
            self.best_acc = record["test_acc"]
        test = f" | test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}%" if "test_acc" in record else ""
        self._print(f"epoch {record['epoch']:g}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}%"
                    f"{test} | {record['images_per_s']:.0f} img/s")  # fmt: skip
        if not self.info.is_main:
            return
        if logger is not None:
            logger.log("epoch", **record)
        if self.cfg.save_checkpoints:
            state = self._state()
            if is_best:  # before last.pt: a kill in between must not leave a best_acc whose model is nowhere
                ckpt.atomic_save(state, self.run_dir / "best.pt")
            ckpt.atomic_save(state, self.run_dir / "last.pt")
            self.saved_step = self.step

    def _stop(self, signum: int) -> None:
        """End a run that ``signum`` stopped at a step boundary: rank 0 makes sure last.pt holds this step and says
        how to continue; every rank waits for it, then raises RunTerminated (SIGTERM) or RunInterrupted (SIGINT)."""
        path = self.run_dir / "last.pt" if self.cfg.save_checkpoints else None
        if self.info.is_main and path is not None and self.saved_step != self.step:
            ckpt.atomic_save(self._state(), path)
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
                   "run_dir": str(self.run_dir), "history": self.history}  # fmt: skip
        if self.info.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if self.cfg.plot:
                plot_curves({self.cfg.model: self.history}, self.run_dir / "curves.png", title=self.cfg.model)
            columns = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s"]
            self._print(format_table(self.history, columns))
        return summary


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True)
