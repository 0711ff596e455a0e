"""What a run dir holds survives bad input, failed writes and kills: a resume from another checkpoint does not
clobber a run, a torn metrics line does not block a resume, a write that fails half-way leaves the old file, best.pt
never lags the best accuracy recorded in last.pt, and image-folder runs resume bit-exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from test_train_engine import (  # noqa: F401 (one_thread: the autouse fixture, shared)
    assert_same_params,
    one_thread,
    run_trainer,
    tiny_cfg,
    tiny_splits,
)

from torchws.train import CheckpointError, RunDirError, load_checkpoint, train
from torchws.train import engine as engine_module
from torchws.train.metrics import MetricsLogger, read_metrics


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- resume from another checkpoint


def test_resume_from_another_run_refuses_an_out_dir_holding_a_run(tmp_path):
    """--resume PATH (not <out-dir>/last.pt) used to overwrite the out-dir's last.pt, best.pt and metrics."""
    splits = tiny_splits()
    train(tiny_cfg(tmp_path / "a", epochs=1), splits=splits, echo=False)
    train(tiny_cfg(tmp_path / "b", epochs=1, seed=1), splits=splits, echo=False)
    other, run = tmp_path / "a/run/last.pt", tmp_path / "b/run"
    before = snapshot(run)
    with pytest.raises(RunDirError, match=r"already holds .*last\.pt.*--resume .*a/run/last\.pt") as error:
        train(tiny_cfg(tmp_path / "b", epochs=2, resume=str(other)), splits=splits, echo=False)
    assert "\n" not in str(error.value) and "--overwrite" in str(error.value)
    with pytest.raises(RunDirError, match=r"best\.pt"):  # a checkpoint of the same dir that is not last.pt
        train(tiny_cfg(tmp_path / "b", epochs=2, resume=str(run / "best.pt")), splits=splits, echo=False)
    assert snapshot(run) == before


def test_resume_from_another_run_with_overwrite_replaces_the_run(tmp_path, monkeypatch):
    """With --overwrite the out-dir holds the new run only: no best.pt, summary or metrics records of the old one."""
    accuracies = iter([50.0, 10.0, 20.0, 40.0])  # a: 50; b: 10, 20; b resumed from a: 40, not a new best
    monkeypatch.setattr(engine_module, "evaluate", lambda *args, **kwargs: (1.0, next(accuracies)))
    splits = tiny_splits()
    train(tiny_cfg(tmp_path / "a", epochs=1), splits=splits, echo=False)
    train(tiny_cfg(tmp_path / "b", epochs=2, seed=1), splits=splits, echo=False)
    run = tmp_path / "b/run"
    train(tiny_cfg(tmp_path / "b", epochs=2, resume=str(tmp_path / "a/run/last.pt"), overwrite=True), splits=splits,
          echo=False)  # fmt: skip
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == sorted(steps) and min(steps) > 6  # only records of the steps this run made (7..12)
    last = load_checkpoint(run / "last.pt")
    assert last["config"]["seed"] == 0 and last["step"] == 12 and last["best_acc"] == 50.0
    assert not (run / "best.pt").exists()  # b's best.pt (seed 1) is not this run's best model
    assert json.loads((run / "summary.json").read_text())["best_test_acc"] == 50.0


@pytest.mark.parametrize("spelling", ["absolute", "relative"])
def test_resume_from_the_out_dirs_own_last_pt_continues(tmp_path, monkeypatch, spelling):
    splits = tiny_splits()
    monkeypatch.chdir(tmp_path)
    train(tiny_cfg(tmp_path, epochs=1), splits=splits, echo=False)
    path = tmp_path / "run/last.pt" if spelling == "absolute" else Path("run/../run/last.pt")
    summary = train(tiny_cfg(tmp_path, epochs=2, resume=str(path)), splits=splits, echo=False)
    assert summary["steps"] == 12
    assert [r["epoch"] for r in read_metrics(tmp_path / "run/metrics.jsonl", "epoch")] == [1, 2]


def test_a_run_without_checkpoints_is_not_overwritten(tmp_path):
    """--no-save-checkpoints leaves metrics.jsonl and summary.json: a second run used to truncate them silently."""
    splits = tiny_splits()
    train(tiny_cfg(tmp_path, epochs=1, save_checkpoints=False), splits=splits, echo=False)
    before = snapshot(tmp_path / "run")
    for resume in (None, "auto"):  # auto: there is no last.pt to continue from
        with pytest.raises(RunDirError, match=r"already holds .*metrics\.jsonl.*--overwrite"):
            train(tiny_cfg(tmp_path, epochs=1, save_checkpoints=False, resume=resume), splits=splits, echo=False)
    assert snapshot(tmp_path / "run") == before


def test_a_run_that_failed_before_its_first_record_may_be_replaced(tmp_path):
    """config.yaml and an empty metrics.jsonl (e.g. out of memory at the first step) hold no results."""
    splits = tiny_splits()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("batch_size: 4096\n")
    (run / "metrics.jsonl").write_text("")
    train(tiny_cfg(tmp_path, epochs=1), splits=splits, echo=False)
    assert len(read_metrics(run / "metrics.jsonl", "epoch")) == 1


def test_unusable_resume_checkpoint_leaves_the_out_dir_untouched(tmp_path):
    splits = tiny_splits()
    train(tiny_cfg(tmp_path, epochs=1), splits=splits, echo=False)
    run = tmp_path / "run"
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=rf"checkpoint {last} is unreadable"):  # named: no fallback
        train(tiny_cfg(tmp_path / "w", epochs=2, resume=str(last)), splits=splits, echo=False)
    with pytest.raises(CheckpointError, match="is not a file"):
        train(tiny_cfg(tmp_path / "x", epochs=2, resume=str(run)), splits=splits, echo=False)
    torch.save({"format": "torchws-train-1", "model": {}}, tmp_path / "partial.pt")  # ours, but keys missing
    with pytest.raises(CheckpointError, match=r"partial\.pt .*optimizer"):
        train(tiny_cfg(tmp_path / "y", epochs=2, resume=str(tmp_path / "partial.pt")), splits=splits, echo=False)
    assert snapshot(run) == before
    assert not any((tmp_path / name / "run").exists() for name in ("w", "x", "y"))


# ---------------------------------------------------------------- metrics.jsonl


def test_resume_after_a_torn_metrics_line(tmp_path):
    """A kill while a record is written leaves half a line; resuming used to fail with a JSONDecodeError."""
    splits = tiny_splits()
    train(tiny_cfg(tmp_path, epochs=1), splits=splits, echo=False)
    metrics = tmp_path / "run/metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train_step", "step": 7, "ep')
    assert len(read_metrics(metrics)) == 7  # readers skip a torn last line
    train(tiny_cfg(tmp_path, epochs=2, resume="auto"), splits=splits, echo=False)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if r["kind"] == "train_step"] == list(range(1, 13))


def test_metrics_keep_a_damaged_record_that_is_not_the_last(tmp_path):
    """Only a torn last line is dropped on resume; a damaged line inside the file is the user's to inspect."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "epoch", "step": 1}\nnot json\n{"kind": "epoch", "step": 2}\n{"kind": "ep')
    MetricsLogger(tmp_path, truncate_after_step=1).close()
    assert path.read_text() == '{"kind": "epoch", "step": 1}\nnot json\n'
    with pytest.raises(ValueError, match=rf"{path}:2"):
        read_metrics(path)


def _in_child_with_file_size_limit(limit: int, function) -> int:
    """Run ``function`` in a forked child whose writes past ``limit`` bytes per file fail (EFBIG), like a full
    disk part-way through a write; returns the child's exit code (0: no exception, 1: an exception)."""
    resource = pytest.importorskip("resource")  # POSIX only, like os.fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write raises OSError instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            function()
            code = 0
        except BaseException:
            pass
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_write_that_fails_half_way_keeps_config_and_metrics(tmp_path):
    """config.yaml and the metrics rewrite on resume used to be written in place: a write that failed part-way (disk
    full, a kill) left them truncated."""
    splits = tiny_splits()
    train(tiny_cfg(tmp_path, epochs=1), splits=splits, echo=False)
    run = tmp_path / "run"
    before = snapshot(run)
    config, metrics = len(before["config.yaml"]), len(before["metrics.jsonl"])
    assert config < metrics
    resume = tiny_cfg(tmp_path, epochs=2, resume="auto")
    assert _in_child_with_file_size_limit(config // 2, lambda: train(resume, splits=splits, echo=False)) == 1
    assert snapshot(run) == before  # the config.yaml write failed
    assert _in_child_with_file_size_limit(config + 16, lambda: train(resume, splits=splits, echo=False)) == 1
    after = snapshot(run)  # config.yaml was replaced, then the metrics rewrite failed
    assert yaml.safe_load(after.pop("config.yaml")) == resume.to_dict()
    assert after == {k: v for k, v in before.items() if k != "config.yaml"}


# ---------------------------------------------------------------- best.pt and last.pt


class Killed(BaseException):
    """Stands for a kill: nothing after it runs."""

    def __str__(self) -> str:
        return "killed"


def test_best_pt_never_lags_the_best_accuracy_in_last_pt(tmp_path, monkeypatch):
    """last.pt used to be written before best.pt: a kill between the two left a last.pt whose best_acc had no
    best.pt, and the resumed run never wrote that model again."""
    accuracies = iter([10.0, 20.0, 20.0, 5.0])  # the resumed run redoes epoch 2
    monkeypatch.setattr(engine_module, "evaluate", lambda *args, **kwargs: (1.0, next(accuracies)))
    real_save = engine_module.ckpt.atomic_save
    saves: list[str] = []

    def save(state, path):
        saves.append(Path(path).name)
        if len(saves) == 3:  # epoch 2 (a new best): the first of its two writes succeeds, then the process dies
            real_save(state, path)
            raise Killed
        real_save(state, path)

    monkeypatch.setattr(engine_module.ckpt, "atomic_save", save)
    splits = tiny_splits()
    with pytest.raises(Killed, match="killed"):
        train(tiny_cfg(tmp_path, epochs=3), splits=splits, echo=False)
    run = tmp_path / "run"
    assert load_checkpoint(run / "best.pt")["best_acc"] >= load_checkpoint(run / "last.pt")["best_acc"]
    train(tiny_cfg(tmp_path, epochs=3, resume="auto"), splits=splits, echo=False)
    assert load_checkpoint(run / "best.pt")["best_acc"] == 20.0 == load_checkpoint(run / "last.pt")["best_acc"]


# ---------------------------------------------------------------- image folders


def write_png_folder(root: Path, per_class: int = 6, size: int = 12) -> None:
    """train/ and val/ with two classes of tiny random PNGs (lossless, so decoding is exact)."""
    pil = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.randint(0, 100, (size, size + i % 3, 3), generator=g) + 120 * c).to(torch.uint8)
                pil.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_image_folder_resume_mid_epoch_is_bit_exact(tmp_path):
    """Augmentation drew from torch's global RNG (per DataLoader worker): a resumed run, or another --workers, saw
    other crops. Now every crop is a function of (seed, epoch, sample index)."""
    write_png_folder(tmp_path / "data")
    recipe = dict(dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=8, batch_size=2, epochs=2,
                  schedule="step", milestones=(1,), gamma=0.5)  # 6 steps per epoch  # fmt: skip
    straight = run_trainer(tiny_cfg(tmp_path / "a", workers=0, **recipe), None)
    first = run_trainer(tiny_cfg(tmp_path / "b", workers=2, max_steps=8, **recipe), None)
    assert first.step == 8 and load_checkpoint(tmp_path / "b/run/last.pt")["batch_in_epoch"] == 2
    resumed = run_trainer(tiny_cfg(tmp_path / "b", workers=1, resume="auto", **recipe), None)
    assert resumed.step == straight.step == 12
    assert_same_params(straight.model, resumed.model)


def test_resumed_tensorboard_purges_the_killed_runs_events_past_the_checkpoint(tmp_path, monkeypatch):
    """The JSON lines drop records past the checkpoint on resume; TensorBoard's events must go too (purge_step), or
    the curves show the killed run's steps twice. A stand-in SummaryWriter records what it was given (tensorboard
    itself is an optional package)."""
    import sys
    import types

    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            made.append((log_dir, purge_step))

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    MetricsLogger(tmp_path, tensorboard=True).close()
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 7}\n{"kind": "train", "step": 9}\n')
    MetricsLogger(tmp_path, tensorboard=True, truncate_after_step=7).close()
    assert made == [(str(tmp_path / "tensorboard"), None), (str(tmp_path / "tensorboard"), 8)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [7]


def test_image_folder_resume_mid_epoch_does_not_decode_the_done_batches(tmp_path, monkeypatch):
    """A resumed epoch's loader starts past its done batches instead of decoding them only to drop them: the resumed
    run reads exactly batch_in_epoch x batch_size fewer images than the same resume replaying the loader."""
    from torchws.data import ImageFolderDataset
    from torchws.train import inputs

    write_png_folder(tmp_path / "data")
    recipe = dict(dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=8, batch_size=2, epochs=1,
                  workers=0)  # fmt: skip
    run_trainer(tiny_cfg(tmp_path / "b", max_steps=3, **recipe), None)  # stops after batch 3 of 6
    reads = []
    original = ImageFolderDataset.__getitem__
    monkeypatch.setattr(ImageFolderDataset, "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    for skipping in (True, False):
        if not skipping:
            monkeypatch.delattr(inputs._FolderTrainLoader, "skip_batches")  # the replay path, as before
        reads.clear()
        run_dir = tmp_path / f"resume_{skipping}"
        shutil.copytree(tmp_path / "b", run_dir)
        resumed = run_trainer(tiny_cfg(run_dir, resume="auto", **recipe), None)
        assert resumed.step == 6
        if skipping:
            fast, fast_params = len(reads), {k: v.clone() for k, v in resumed.model.state_dict().items()}
    assert len(reads) - fast == 3 * 2
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, fast_params[key]), key
