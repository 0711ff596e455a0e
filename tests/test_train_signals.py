"""A kill signal does not lose the run: SIGTERM / SIGINT finish the optimizer step in progress, write last.pt and
exit with 143 / 130, and a resume reproduces the uninterrupted run bit for bit (single process and DDP: rank 0
writes, no rank hangs). Temp files a killed atomic write left are removed when a run starts, never taken for run
files. The signals come from outside the process, while it is in the middle of a step: the trainer's step function
is wrapped in the child so that at a chosen step it says so (a file) and waits until the test has signalled it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fixtures_data import write_fashion_dir
from test_train_engine import (  # noqa: F401 (one_thread: the autouse fixture, shared)
    assert_same_params,
    one_thread,
    run_trainer,
    tiny_cfg,
    tiny_splits,
)
from test_train_reliability import write_png_folder

from torchws.train import engine as engine_module
from torchws.train import load_checkpoint, save_config, train
from torchws.train.atomic import atomic_write, atomic_write_text, is_temp_file
from torchws.train.distributed import DistInfo
from torchws.train.engine import RunInterrupted, RunTerminated
from torchws.train.metrics import read_metrics
from torchws.train.signals import StopSignals

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

# Run in the child: `python CHILD READY_FILE PAUSE_AT torchws-train-args...`. At the end of the PAUSE_AT-th call of
# train_step (gradients ready, optimizer step not yet taken) it writes its pid to READY_FILE and waits until the
# test deletes the file, which the test does right after sending the signal.
CHILD = """
import os, sys, time
from pathlib import Path

import torch

from torchws.cli import main
from torchws.train import engine

torch.set_num_threads(1)
ready, pause_at = Path(sys.argv[1]), int(sys.argv[2])
real_step, calls = engine.train_step, [0]


def step_then_wait(*args, **kwargs):
    real_step(*args, **kwargs)
    calls[0] += 1
    if calls[0] == pause_at:
        ready.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while ready.exists() and time.monotonic() < deadline:
            time.sleep(0.002)


engine.train_step = step_then_wait
sys.exit(main(["train", *sys.argv[3:]]))
"""

TIMEOUT = 60  # seconds for a child; the runs take a few


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Fashion-MNIST files of 48 train and 24 test images: 6 steps of 8 per epoch."""
    folder = tmp_path_factory.mktemp("fashion_mnist")
    write_fashion_dir(folder, n_train=48, n_test=24)
    return folder


def recipe(out: Path, data: Path, **overrides):
    return tiny_cfg(out, dataset="fashion_mnist", data_dir=str(data), augment="crop_flip", **overrides)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> torch.nn.Module:
    """The uninterrupted run (2 epochs, 12 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_trainer(recipe(tmp_path_factory.mktemp("straight"), data_dir), None).model
    finally:
        torch.set_num_threads(threads)


def start_child(tmp_path: Path, pause_at: int, args: list[str], env: dict[str, str] | None = None,
                name: str = "ready", own_group: bool = False) -> tuple[subprocess.Popen, Path]:  # fmt: skip
    """own_group: the child leads a process group of its own (its pid is the group id), as under a scheduler."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ready = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, str(script), str(ready), str(pause_at), *args]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             process_group=0 if own_group else None)  # fmt: skip
    return child, ready


def wait_for(ready: Path, children: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready.exists():
        for child in children:
            if child.poll() is not None:
                raise AssertionError(f"the child exited with {child.returncode} first: {child.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the child never reached the step"
        time.sleep(0.01)


def finish(child: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        raise AssertionError(f"the child hung after the signal: {err[-3000:]}") from None
    return child.returncode, out, err


def signal_mid_step(tmp_path: Path, data: Path, signum: int, pause_at: int) -> tuple[int, str, str]:
    """Run `torchws train` in a child with the recipe's config; send ``signum`` during step ``pause_at``."""
    config = tmp_path / "recipe.yaml"
    save_config(recipe(tmp_path, data), config)
    child, ready = start_child(tmp_path, pause_at, ["--config", str(config)])
    try:
        wait_for(ready, [child])
        os.kill(child.pid, signum)
        ready.unlink()
        return finish(child)
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.parametrize("signum, status, pause_at", [
    (signal.SIGTERM, 143, 3),  # mid-epoch: the step finishes, last.pt holds it and a partial-epoch record
    (signal.SIGINT, 130, 6),  # the epoch's last step: the epoch ends first (evaluation, its record, last.pt)
])  # fmt: skip
def test_signal_saves_last_pt_and_resume_is_bit_exact(tmp_path, data_dir, straight, signum, status, pause_at):
    code, _, err = signal_mid_step(tmp_path, data_dir, signum, pause_at)
    assert code == status, err[-3000:]
    run = tmp_path / "run"
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == pause_at  # the step in progress was finished, no further one started
    assert (state["epoch"], state["batch_in_epoch"]) == ((0, 3) if pause_at == 3 else (1, 0))
    name = signal.Signals(signum).name
    line = f"torchws: {name}: stopped after step {pause_at} of 12; saved {run / 'last.pt'}; to continue, run the same"
    assert line in err and "Traceback" not in err
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train_step"] == list(range(1, pause_at + 1))
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0.5 if pause_at == 3 else 1]
    assert ("test_acc" in epochs[0]) == (pause_at == 6)
    assert not (run / "summary.json").exists()
    assert not [p for p in run.iterdir() if is_temp_file(p)]
    resumed = run_trainer(recipe(tmp_path, data_dir, resume="auto"), None)
    assert resumed.step == 12
    assert_same_params(straight, resumed.model)


def test_sigterm_in_process_raises_run_terminated_and_restores_handlers(tmp_path, monkeypatch):
    """As a library (here: inside pytest's process): RunTerminated is a SystemExit(143) carrying the checkpoint,
    raised after the step in progress; the handlers that were there before come back, after a stop or a full run."""

    def previous(signum, frame):  # the caller's own SIGTERM handler
        raise AssertionError("the trainer's handler should have been in place")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        real_step, seen = engine_module.train_step, []

        def step(*args, **kwargs):
            real_step(*args, **kwargs)
            seen.append(signal.getsignal(signal.SIGTERM))
            if len(seen) == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(engine_module, "train_step", step)
        with pytest.raises(RunTerminated, match="^143$") as stopped:
            train(tiny_cfg(tmp_path), splits=tiny_splits(), echo=False)
        assert stopped.value.code == 143 and isinstance(stopped.value, SystemExit)
        assert stopped.value.checkpoint == tmp_path / "run/last.pt"
        assert "--resume auto" in stopped.value.message
        assert load_checkpoint(tmp_path / "run/last.pt")["step"] == 2
        assert seen[0] is not previous and signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        summary = train(tiny_cfg(tmp_path, resume="auto"), splits=tiny_splits(), echo=False)
        assert summary["steps"] == 12 and signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_handlers_are_left_alone_outside_the_main_thread_and_when_ignored(tmp_path, monkeypatch):
    """signal.signal works only in the main thread; a SIG_IGN'd SIGINT (nohup, background jobs) stays ignored."""
    real_step, seen = engine_module.train_step, []
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))

    def step(*args, **kwargs):
        real_step(*args, **kwargs)
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))

    monkeypatch.setattr(engine_module, "train_step", step)
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            train(tiny_cfg(tmp_path / "thread", max_steps=1), splits=tiny_splits(), echo=False)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert not errors and seen == [before]
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        train(tiny_cfg(tmp_path / "ignored", max_steps=1), splits=tiny_splits(), echo=False)
        assert seen[1][0] is not before[0] and seen[1][1] is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_second_ctrl_c_interrupts_at_once():
    stop = StopSignals(DistInfo(), torch.device("cpu"))
    with stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.poll() == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards one after a Ctrl-C: still the first request
        assert stop.poll() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match="^$") as raised:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this returns
        assert not isinstance(raised.value, RunInterrupted)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_leaves_dataloader_workers_running(tmp_path, signum, status):
    """Schedulers signal every process of a job, a terminal's Ctrl-C the foreground group: the image-folder loader's
    workers get the signal too. They used to die of SIGTERM and the trainer then raised "DataLoader worker ... killed
    by signal" (mid-step or while shutting the workers down); now they ignore both signals, the trainer stops cleanly
    at the step boundary and ends them."""
    write_png_folder(tmp_path / "data")  # 12 train images: 6 steps of 2
    cfg = tiny_cfg(tmp_path, dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=8, batch_size=2,
                   workers=2, epochs=1)  # fmt: skip
    save_config(cfg, tmp_path / "recipe.yaml")
    # at step 2 both workers have delivered a batch (in order: worker 0, then 1), so both are past their init
    child, ready = start_child(tmp_path, 2, ["--config", str(tmp_path / "recipe.yaml")], own_group=True)
    try:
        wait_for(ready, [child])
        os.killpg(child.pid, signum)
        ready.unlink()
        code, _, err = finish(child)
        deadline = time.monotonic() + TIMEOUT  # the workers end with the trainer, none is left behind
        while _group_alive(child.pid):
            assert time.monotonic() < deadline, "DataLoader workers outlived the trainer"
            time.sleep(0.05)
    finally:
        if _group_alive(child.pid):
            os.killpg(child.pid, signal.SIGKILL)
    assert code == status, err[-3000:]
    assert f"{signal.Signals(signum).name}: stopped after step 2 of 6" in err
    assert "Traceback" not in err and "DataLoader" not in err
    assert load_checkpoint(tmp_path / "run/last.pt")["step"] == 2


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- stale temp files


def test_stale_temp_files_are_removed_and_never_taken_for_run_files(tmp_path):
    """A write killed between creating its temp file and the rename leaves ``.last.pt.<pid>.<hex>.tmp``: a complete
    checkpoint under a temp name. It must not count as the run's last.pt (resume, "dir holds a run") and is removed
    when a run starts or resumes; other files are kept."""
    splits, run = tiny_splits(), tmp_path / "run"
    train(tiny_cfg(tmp_path / "other", epochs=1), splits=splits, echo=False)
    run.mkdir()
    stale = run / ".last.pt.4242.0badcafe.tmp"
    stale.write_bytes((tmp_path / "other/run/last.pt").read_bytes())
    (run / ".metrics.jsonl.4242.12345678.tmp").write_text('{"kind": "epoch", "step": 99}\n')
    (run / "notes.tmp").write_text("mine")  # not a name atomic_write makes
    summary = train(tiny_cfg(tmp_path, epochs=1, resume="auto"), splits=splits, echo=False)  # a fresh run
    assert summary["steps"] == 6 and [r["step"] for r in read_metrics(run / "metrics.jsonl", "epoch")] == [6]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl",
                                                     "notes.tmp", "summary.json"]  # fmt: skip
    stale.write_bytes(b"torn")  # now next to a real last.pt: the resume reads last.pt and drops this one
    summary = train(tiny_cfg(tmp_path, epochs=2, resume="auto"), splits=splits, echo=False)
    assert summary["steps"] == 12 and not stale.exists() and (run / "notes.tmp").exists()


def test_temp_names_of_atomic_write_are_recognised(tmp_path):
    seen: list[str] = []
    atomic_write_text(tmp_path / "summary.json", "{}")
    atomic_write(tmp_path / "last.pt", lambda f: seen.extend(os.listdir(tmp_path)))
    temp = [name for name in seen if name not in ("summary.json", "last.pt")]
    assert len(temp) == 1 and is_temp_file(temp[0]) and temp[0].startswith(".last.pt.")
    for name in ("last.pt", "notes.tmp", ".last.pt.tmp", ".x.12.0123456.tmp", ".x.12.0123456g.tmp", "a.1.01234567.tmp"):
        assert not is_temp_file(name), name


# ---------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path, data_dir):
    """Two gloo ranks started as torchrun would; only rank 1 gets SIGTERM (in step 2). Both ranks stop after step 2,
    rank 0 alone writes last.pt and prints, both exit with 143 and none hangs."""
    cfg = recipe(tmp_path, data_dir, batch_size=4, epochs=1)
    save_config(cfg, tmp_path / "recipe.yaml")
    port = str(_free_port())
    children, readies = [], []
    for rank in (0, 1):
        env = dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        child, ready = start_child(tmp_path, 2 if rank == 1 else 10**6, ["--config", str(tmp_path / "recipe.yaml")],
                                   env, name=f"ready{rank}")  # fmt: skip
        children.append(child)
        readies.append(ready)
    try:
        wait_for(readies[1], children)
        os.kill(children[1].pid, signal.SIGTERM)
        readies[1].unlink()
        results = [finish(child) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert [code for code, _, _ in results] == [143, 143], results[1][2][-3000:] + results[0][2][-3000:]
    assert load_checkpoint(tmp_path / "run/last.pt")["step"] == 2
    assert "SIGTERM: stopped after step 2 of 6" in results[0][2] and "stopped" not in results[1][2]


# ---------------------------------------------------------------- a stuck DataLoader worker

STUCK_CHILD = """
import sys, time
import torch
from torch.utils.data import get_worker_info
from torchws.cli import main
from torchws.data import ImageFolderDataset

torch.set_num_threads(1)
real = ImageFolderDataset.__getitem__


def getitem(self, index):
    if get_worker_info() is not None and self.split_dir.name == "train" and index == STUCK_INDEX:
        time.sleep(3600)  # a read that never returns (a hung file system); SIGTERM is ignored in the workers
    return real(self, index)


ImageFolderDataset.__getitem__ = getitem
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_stuck_dataloader_worker_cannot_hang_the_exit(tmp_path):
    """max_steps ends the run while a worker is stuck preparing a batch nobody will take: the run writes its files
    and exits within the bounded shutdown (it used to wait for the worker forever at interpreter exit)."""
    from torch.utils.data import RandomSampler

    write_png_folder(tmp_path / "data")  # 12 train images, 6 steps of 2 per epoch
    order = list(RandomSampler(range(12), generator=torch.Generator().manual_seed(0)))
    script = tmp_path / "child.py"
    script.write_text(STUCK_CHILD.replace("STUCK_INDEX", str(order[4])))  # batch 3: prefetched, never taken
    cfg = tiny_cfg(tmp_path, dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=8, batch_size=2,
                   workers=1, epochs=1, max_steps=2)  # fmt: skip
    save_config(cfg, tmp_path / "recipe.yaml")
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, str(script), "--config", str(tmp_path / "recipe.yaml")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        _, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the stuck worker too: it holds the pipes open
        raise AssertionError(f"the run did not exit: {child.communicate()[1][-3000:]}") from None
    finally:
        if _group_alive(child.pid):
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 0, err[-3000:]
    assert time.monotonic() - started < TIMEOUT and (tmp_path / "run/summary.json").is_file()
