"""What a run reports: TensorBoard events read back with the tensorboard package (scalars and steps, and a resume
that purges the events past its checkpoint), plain progress lines when the output is not a terminal, --threads, and
the help text."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from test_train_engine import one_thread, tiny_cfg, tiny_splits  # noqa: F401 (one_thread: the autouse fixture)

from torchws.train import engine as engine_module
from torchws.train import parse_config, train
from torchws.train.errors import ConfigError
from torchws.train.metrics import read_metrics
from torchws.train.progress import Progress

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of ``tag`` that TensorBoard shows (purged events left out)."""
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def as_float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))  # TensorBoard stores float32


def test_tensorboard_events_hold_the_metrics_records(tmp_path):
    train(tiny_cfg(tmp_path, tensorboard=True), splits=tiny_splits(), echo=False)
    run = tmp_path / "run"
    steps = read_metrics(run / "metrics.jsonl", "train_step")
    assert scalars(run, "train_step/loss") == [(r["step"], as_float32(r["loss"])) for r in steps]
    assert [s for s, _ in scalars(run, "train_step/lr")] == list(range(1, 13))
    epochs = read_metrics(run / "metrics.jsonl", "epoch")
    assert scalars(run, "epoch/test_acc") == [(r["step"], as_float32(r["test_acc"])) for r in epochs]
    assert [s for s, _ in scalars(run, "epoch/test_acc")] == [6, 12]


def test_resume_purges_the_events_past_the_checkpoint(tmp_path):
    """A run whose events reach step 12 but whose last.pt is at step 6 (killed after its events were written): the
    resumed run, with another lr, rewrites steps 7-12, and TensorBoard shows each step once, with the new values."""
    cfg = tiny_cfg(tmp_path, tensorboard=True, keep_checkpoints=2, schedule="constant", warmup_epochs=0.0)
    train(cfg, splits=tiny_splits(), echo=False)
    run = tmp_path / "run"
    shutil.copy(run / "checkpoint-step0000006.pt", run / "last.pt")
    old = dict(scalars(run, "train_step/lr"))
    train(tiny_cfg(tmp_path, tensorboard=True, schedule="constant", warmup_epochs=0.0, lr=0.2, resume="auto"),
          splits=tiny_splits(), echo=False)  # fmt: skip
    lrs = scalars(run, "train_step/lr")
    assert [s for s, _ in lrs] == list(range(1, 13))
    assert [v for s, v in lrs if s <= 6] == [old[s] for s in range(1, 7)]
    assert {v for s, v in lrs if s > 6} == {as_float32(0.2 * 8 / 256)} != {old[7]}
    losses = read_metrics(run / "metrics.jsonl", "train_step")
    assert scalars(run, "train_step/loss") == [(r["step"], as_float32(r["loss"])) for r in losses]


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path, capsys):
    train(tiny_cfg(tmp_path, progress=True, log_every=4, progress_seconds=3600.0), splits=tiny_splits())
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    lines = [line for line in out.splitlines() if " step " in line and line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2 step 4/6", "epoch 2/2 step 4/6"]
    assert re.fullmatch(r"epoch 1/2 step 4/6: loss \d+\.\d{4}, \d+ img/s, lr [\d.e-]+", lines[0])


def test_progress_lines_every_n_steps_or_seconds(capsys):
    by_steps = Progress(12, 0, "epoch 1/1", 5, 3600.0, terminal=False)
    for _ in range(12):
        by_steps.update(1.0, 10.0, 0.1)
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == [
        "epoch 1/1 step 5/12",
        "epoch 1/1 step 10/12",
    ]
    by_time = Progress(3, 0, "e", 100, 0.0, terminal=False)  # every update is past the interval
    for _ in range(3):
        by_time.update(1.0, 10.0, 0.1)
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_progress_on_a_terminal_is_a_tqdm_bar():
    import io

    from tqdm import tqdm

    stream = io.StringIO()
    bar = Progress(3, 0, "epoch 1/1", 1, 0.0, terminal=True, stream=stream)
    for _ in range(3):
        bar.update(1.0, 10.0, 0.1)
    assert isinstance(bar.bar, tqdm) and bar.bar.n == 3
    bar.close()
    assert stream.getvalue().startswith("\repoch 1/1:") and "loss=1.0000" in stream.getvalue()


def test_threads_flag_sets_torch_threads_during_the_run_only(tmp_path, monkeypatch):
    seen, real = [], engine_module.train_step
    monkeypatch.setattr(engine_module, "train_step", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a,
                        **k))  # fmt: skip
    torch.set_num_threads(2)
    train(tiny_cfg(tmp_path, threads=1, max_steps=2), splits=tiny_splits(), echo=False)
    assert seen == [1, 1] and torch.get_num_threads() == 2
    assert parse_config(["--threads", "3"]).threads == 3
    with pytest.raises(ConfigError, match=r"--threads must be >= 0, got -1"):
        parse_config(["--threads", "-1"])


def test_help_states_each_default_once():
    from torchws.cli import build_parser

    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]  # argparse keeps subparsers here
    text = " ".join(train_parser.format_help().split())
    assert "(default: all)" in text and "--threads" in text and "--keep-checkpoints" in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text), re.search(r".{60}\(default: [^)]*\) \(default:",
                                                                            text)  # fmt: skip
