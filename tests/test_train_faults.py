"""Fault suite: a run killed at any moment and relaunched with the same command (``--resume auto``, as a scheduler
requeues it) ends identical to an uninterrupted run: weights, optimizer state, checkpoints' contents and metrics
records (timings aside). Damaged checkpoints are detected and passed over with a message. Each kill is a real
SIGKILL: a forked child runs the trainer with one function wrapped so that the child kills itself at that point."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_train_engine import (  # noqa: F401 (one_thread, registered_test_models: autouse fixtures)
    DROPOUT_MODEL,
    assert_same_optimizer_state,
    assert_same_params,
    one_thread,
    registered_test_models,
    tiny_cfg,
    tiny_splits,
)

from torchws.train import CheckpointError, RunDirError, load_checkpoint, train
from torchws.train import engine as engine_module
from torchws.train import metrics as metrics_module
from torchws.train import rundir as rundir_module
from torchws.train.atomic import is_temp_file
from torchws.train.checkpoint import checksum
from torchws.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork and signals")

TIMING = ("images_per_s", "train_time_s")  # the only values that differ between two identical runs


def recipe(tmp_path: Path, **overrides):
    """3 epochs of 6 steps of the dropout model (its training draws from the global RNG), kept checkpoints: 2."""
    base = dict(model=DROPOUT_MODEL, epochs=3, resume="auto", augment="crop_flip", schedule="step", milestones=(1, 2),
                gamma=0.5, keep_checkpoints=2)  # fmt: skip
    return tiny_cfg(tmp_path, **{**base, **overrides})


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def run_dir_contents(run: Path) -> dict:
    """What a finished run dir holds, comparable between runs: checkpoint states and records without timings."""
    out = {"files": sorted(p.name for p in run.iterdir())}
    for name in out["files"]:
        if name.endswith(".pt"):
            state = load_checkpoint(run / name)
            state["rng"] = checksum(state["rng"])
            state["config"].pop("out_dir")  # the only difference in the config of two runs in two dirs
            out[name] = without_timing(state)
    out["metrics"] = without_timing(read_metrics(run / "metrics.jsonl"))
    summary = json.loads((run / "summary.json").read_text())
    out["summary"] = without_timing({k: v for k, v in summary.items() if k != "run_dir"})
    return out


def assert_same_run(a: dict, b: dict) -> None:
    assert a["files"] == b["files"]
    assert a["metrics"] == b["metrics"]
    assert a["summary"] == b["summary"]
    for name in a["files"]:
        if name.endswith(".pt"):
            x, y = a[name], b[name]
            assert_same_params(x["model"], y["model"])
            assert_same_optimizer_state(x["optimizer"], y["optimizer"])
            assert sorted(x) == sorted(y), name
            for key in x:
                if key not in ("model", "optimizer"):
                    assert x[key] == y[key], (name, key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run, launched with --resume auto into a new dir."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("straight")
        train(recipe(out), splits=tiny_splits(), echo=False)
        return run_dir_contents(out / "run")
    finally:
        torch.set_num_threads(threads)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_until_killed(cfg, patch: Callable[[], None]) -> None:
    """Run ``train(cfg)`` in a forked child after ``patch()`` installed the kill; assert the child died of SIGKILL."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            patch()
            train(cfg, splits=tiny_splits(), echo=False)
        finally:
            os._exit(0)  # only when the kill point never came: the parent reports it
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the kill point was never reached"


def kill_at_call(owner, name: str, call: int, *, before: bool = False) -> Callable[[], None]:
    """A patch: ``owner.name``'s ``call``-th call kills the process (after it returns, or ``before`` it runs)."""

    def patch() -> None:
        real, calls = getattr(owner, name), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if before and calls[0] == call:
                kill_self()
            result = real(*args, **kwargs)
            if calls[0] == call:
                kill_self()
            return result

        setattr(owner, name, wrapper)

    return patch


def kill_mid_write(call: int) -> Callable[[], None]:
    """A patch: the ``call``-th torch.save writes half a checkpoint into its temp file, then the process dies."""

    def patch() -> None:
        real, calls = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] == call:
                real(obj, f, *args, **kwargs)
                f.flush()
                f.truncate(f.tell() // 2)
                kill_self()
            real(obj, f, *args, **kwargs)

        torch.save = save

    return patch


# (id, patch): the moments a kill can land, in the order a run passes them. Checkpoint writes per epoch: best.pt
# (a new best) then last.pt; with dropout and these lrs every epoch's accuracy is a new best or not, either way the
# first torch.save is epoch 1's best.pt.
KILLS = [
    ("startup_before_config", lambda: kill_at_call(engine_module, "save_config", 1, before=True)()),
    ("startup_after_config", lambda: kill_at_call(engine_module, "save_config", 1)()),
    ("before_first_checkpoint", lambda: kill_at_call(engine_module, "train_step", 4)()),
    ("during_first_evaluation", lambda: kill_at_call(engine_module, "evaluate", 1, before=True)()),
    ("during_first_checkpoint_write", lambda: kill_mid_write(1)()),
    ("between_best_and_last", lambda: kill_at_call(rundir_module.ckpt, "save_checkpoint", 2, before=True)()),
    ("mid_epoch_2", lambda: kill_at_call(engine_module, "train_step", 9)()),
    ("during_evaluation_2", lambda: kill_at_call(engine_module, "evaluate", 2, before=True)()),
    ("during_checkpoint_write_2", lambda: kill_mid_write(3)()),
    ("while_keeping_an_older_checkpoint", lambda: kill_at_call(rundir_module, "atomic_link", 1)()),
    ("after_last_checkpoint", lambda: kill_at_call(engine_module, "atomic_write_text", 1, before=True)()),
    ("after_summary", lambda: kill_at_call(engine_module, "atomic_write_text", 1)()),
]


@pytest.mark.parametrize("patch", [k[1] for k in KILLS], ids=[k[0] for k in KILLS])
def test_requeue_after_a_kill_ends_identical(tmp_path, straight, patch):
    cfg = recipe(tmp_path)
    run_until_killed(cfg, patch)
    train(cfg, splits=tiny_splits(), echo=False)  # the scheduler relaunches the same command
    run = tmp_path / "run"
    assert not [p for p in run.iterdir() if is_temp_file(p)]
    assert_same_run(run_dir_contents(run), straight)


def test_requeue_after_kills_in_a_row(tmp_path, straight):
    """Killed mid-epoch, then killed again while the requeued run rewrites metrics.jsonl, then in its evaluation."""
    cfg = recipe(tmp_path)
    run_until_killed(cfg, kill_at_call(engine_module, "train_step", 8))
    run_until_killed(cfg, kill_at_call(metrics_module, "atomic_write_text", 1))
    run_until_killed(cfg, kill_at_call(engine_module, "evaluate", 1, before=True))
    train(cfg, splits=tiny_splits(), echo=False)
    assert_same_run(run_dir_contents(tmp_path / "run"), straight)


def test_requeue_before_the_first_checkpoint_says_it_restarts(tmp_path, capsys, straight):
    cfg = recipe(tmp_path)
    run_until_killed(cfg, kill_at_call(engine_module, "train_step", 4))
    assert [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl")] == [1, 2, 3]
    train(cfg, splits=tiny_splits(), echo=False)
    assert "holds records but no checkpoint of this run: it restarts from step 0" in capsys.readouterr().err
    assert_same_run(run_dir_contents(tmp_path / "run"), straight)


def test_a_changed_command_does_not_restart_a_killed_run(tmp_path):
    """The restart from step 0 is for the same command only: another config would replace the records of a run."""
    cfg = recipe(tmp_path)
    run_until_killed(cfg, kill_at_call(engine_module, "train_step", 4))
    before = (tmp_path / "run/metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match=r"already holds metrics\.jsonl; pass --overwrite"):
        train(recipe(tmp_path, lr=0.1), splits=tiny_splits(), echo=False)
    assert (tmp_path / "run/metrics.jsonl").read_bytes() == before


# ---------------------------------------------------------------- damaged checkpoints


def finished_run(tmp_path: Path, epochs: int = 2, **overrides) -> Path:
    train(recipe(tmp_path, epochs=epochs, **overrides), splits=tiny_splits(), echo=False)
    return tmp_path / "run"


def flip_bytes_inside_a_tensor(path: Path) -> None:
    """Overwrite 16 bytes of the largest tensor's storage: torch.load reads the file without noticing."""
    data = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    largest = max((t for t in state["model"].values()), key=lambda t: t.numel())
    needle = largest.contiguous().numpy().tobytes()[:64]
    at = data.find(needle)
    assert at > 0
    data[at : at + 16] = bytes(16)
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["format"] == "torchws-train-1"  # still loads


DAMAGES = {
    "truncated": lambda p, tmp: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "corrupted": lambda p, tmp: flip_bytes_inside_a_tensor(p),
    "not_a_checkpoint": lambda p, tmp: p.write_bytes(b"PK\x03\x04 not a zip"),
    "empty": lambda p, tmp: p.write_bytes(b""),
    "plain_state_dict": lambda p, tmp: torch.save(torch.nn.Linear(2, 2).state_dict(), p),
    "another_model": lambda p, tmp: p.write_bytes(
        (finished_run(tmp / "other", epochs=1, model="cifar_resnet20_gn_ws") / "last.pt").read_bytes()),
}  # fmt: skip
MESSAGES = {
    "truncated": "is unreadable",
    "corrupted": "is corrupt: its contents do not match the checksum",
    "not_a_checkpoint": "is unreadable",
    "empty": "is unreadable",
    "plain_state_dict": "is not a torchws training checkpoint",
    "another_model": "was saved from model 'cifar_resnet20_gn_ws' and does not fit this model",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_last_pt_falls_back_to_the_newest_valid_checkpoint(tmp_path, capsys, straight, damage):
    """last.pt of epoch 2 damaged: --resume auto says what is wrong with it, resumes from checkpoint-step0000006.pt
    (epoch 1) and ends identical to the uninterrupted 3-epoch run."""
    run = finished_run(tmp_path)
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "checkpoint-step0000006.pt", "last.pt"]
    if load_checkpoint(run / "best.pt")["step"] == 12:  # best.pt would be the newest valid one: not this test's case
        (run / "best.pt").unlink()
    DAMAGES[damage](run / "last.pt", tmp_path)
    capsys.readouterr()
    train(recipe(tmp_path), splits=tiny_splits(), echo=False)
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'last.pt'} {MESSAGES[damage]}" in err
    assert f"resuming from {run / 'checkpoint-step0000006.pt'} (step 6), the newest valid checkpoint" in err
    contents = run_dir_contents(run)
    for name in ("last.pt", "checkpoint-step0000012.pt"):
        assert_same_params(contents[name]["model"], straight[name]["model"])
    assert contents["metrics"] == straight["metrics"]


def test_every_checkpoint_damaged_is_an_error_naming_each(tmp_path):
    run = finished_run(tmp_path)
    for path in run.glob("*.pt"):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*last\.pt is unreadable.*best\.pt is unread"):
        train(recipe(tmp_path), splits=tiny_splits(), echo=False)


class RunsCode:
    """Unpickling this calls ``os.system``: the kind of object a checkpoint must never be allowed to hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_code_is_refused_and_nothing_runs(tmp_path, capsys):
    run = finished_run(tmp_path)
    marker = tmp_path / "code-ran"
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save({**state, "history": [RunsCode(marker)]}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt holds Python objects other than tensors .*refused.*system"):
        train(recipe(tmp_path / "new", resume=str(tmp_path / "evil.pt")), splits=tiny_splits(), echo=False)
    (tmp_path / "evil.pt").replace(run / "last.pt")  # as the run's own last.pt: passed over, with the reason
    train(recipe(tmp_path), splits=tiny_splits(), echo=False)
    assert "holds Python objects other than tensors" in capsys.readouterr().err
    assert not marker.exists()  # nothing was executed, on either path


@pytest.mark.parametrize("keep, older", [(1, []), (2, [12]), (3, [6, 12])])
def test_keep_checkpoints_keeps_the_newest(tmp_path, keep, older):
    """last.pt (step 18) and the keep - 1 checkpoints before it; each kept file holds the state of its step."""
    run = finished_run(tmp_path, epochs=3, keep_checkpoints=keep)
    kept = sorted(rundir_module.kept_checkpoints(run))
    assert kept == older
    for step in kept:
        state = load_checkpoint(run / f"checkpoint-step{step:07d}.pt")
        assert state["step"] == step and state["epoch"] == step // 6
    assert load_checkpoint(run / "last.pt")["step"] == 18


def test_fallback_takes_the_newest_valid_checkpoint_by_step(tmp_path, capsys):
    """last.pt damaged, best.pt of step 12 and checkpoint-step0000006.pt both valid: best.pt is the newer one."""
    accuracies = iter([10.0, 20.0, 30.0])  # every epoch a new best: best.pt is at step 12 after 2 epochs
    real = engine_module.evaluate
    engine_module.evaluate = lambda *args, **kwargs: (1.0, next(accuracies))
    try:
        run = finished_run(tmp_path)
        assert load_checkpoint(run / "best.pt")["step"] == 12
        (run / "last.pt").write_bytes(b"")
        capsys.readouterr()
        train(recipe(tmp_path), splits=tiny_splits(), echo=False)
    finally:
        engine_module.evaluate = real
    assert f"resuming from {run / 'best.pt'} (step 12)" in capsys.readouterr().err
    assert load_checkpoint(run / "last.pt")["step"] == 18
