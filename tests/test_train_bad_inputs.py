"""Bad input, everywhere: each row of the table in docs/reliability.md is one case here. Every refused input gets one
line on stderr and exit code 2, creates no run dir, and leaves a finished run it points at byte for byte as it was.
Images that are only unusual (grayscale, RGBA, mixed sizes) are accepted and trained on."""

from __future__ import annotations

import gzip
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fixtures_data import write_fashion_dir
from test_train_engine import one_thread  # noqa: F401 (the autouse fixture, shared)

from torchws.cli import main

BASE = ["train", "--dataset", "digits", "--model", "cifar_resnet20_gn_ws", "--batch-size", "32", "--epochs", "1",
        "--max-train-images", "64", "--max-eval-images", "32", "--no-progress", "--no-tensorboard", "--no-plot",
        "--device", "cpu", "--threads", "1", "--workers", "0"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> Path:
    """A finished run (digits, 2 steps): the run the bad inputs must not damage."""
    root = tmp_path_factory.mktemp("prior")
    threads = torch.get_num_threads()
    try:
        assert main([*BASE, "--out-dir", str(root / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def write_png(path: Path, mode: str, size: tuple[int, int], value: int = 100) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = torch.full((size[1], size[0], channels), value, dtype=torch.uint8).squeeze(-1).numpy()
    Image.fromarray(pixels, mode=mode).save(path)


def image_folder(root: Path, mode: str = "RGB", sizes: tuple[tuple[int, int], ...] = ((16, 16),)) -> Path:
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                write_png(root / split / name / f"{i}.png", mode, sizes[i % len(sizes)], 60 + 100 * c + i)
    return root


def imagefolder_args(root: Path) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "8", "--batch-size", "2"]


def fashion_dir(tmp: Path, damage: Callable[[Path], None]) -> list[str]:
    folder = tmp / "fashion"
    write_fashion_dir(folder, n_train=64, n_test=16)
    damage(folder)
    return ["--dataset", "fashion_mnist", "--data-dir", str(folder)]


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def rewrite_gz(path: Path, change: Callable[[bytes], bytes]) -> None:
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))


def other_checkpoint(tmp: Path, *extra: str) -> Path:
    threads = torch.get_num_threads()
    try:
        assert main([*BASE, *extra, "--out-dir", str(tmp / "other")]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp / "other" / "last.pt"


def yaml_file(tmp: Path, text: str) -> list[str]:
    (tmp / "bad.yaml").write_text(text)
    return ["--config", str(tmp / "bad.yaml")]


# (id, arguments added to BASE (a function of tmp_path and the prior run dir), what the one line must match)
Case = tuple[str, Callable[[Path, Path], list[str]], str]
CASES: list[Case] = [
    # flags out of range and of the wrong type
    ("batch_size_zero", lambda t, p: ["--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
    ("batch_size_word", lambda t, p: ["--batch-size", "two"], r"argument --batch-size: invalid int value: 'two'"),
    ("epochs_negative", lambda t, p: ["--epochs", "-1"], r"--epochs must be >= 1, got -1"),
    ("lr_zero", lambda t, p: ["--lr", "0"], r"--lr must be > 0.0, got 0.0"),
    ("lr_nan", lambda t, p: ["--lr", "nan"], r"--lr must be > 0.0, got nan"),
    ("lr_word", lambda t, p: ["--lr", "fast"], r"argument --lr: invalid float value: 'fast'"),
    ("accum_steps_zero", lambda t, p: ["--accum-steps", "0"], r"--accum-steps must be >= 1"),
    ("schedule_unknown", lambda t, p: ["--schedule", "linear"], r"argument --schedule: invalid choice: 'linear'"),
    ("milestones_decreasing", lambda t, p: ["--milestones", "60", "30"], r"--milestones must be increasing"),
    ("milestones_word", lambda t, p: ["--milestones", "x"], r"argument --milestones: invalid int value: 'x'"),
    ("max_steps_zero", lambda t, p: ["--max-steps", "0"], r"--max-steps must be >= 1 \(or unset\), got 0"),
    ("workers_negative", lambda t, p: ["--workers", "-2"], r"--workers must be >= 0, got -2"),
    ("warmup_negative", lambda t, p: ["--warmup-epochs", "-1"], r"--warmup-epochs must be >= 0.0, got -1.0"),
    ("keep_checkpoints_zero", lambda t, p: ["--keep-checkpoints", "0"], r"--keep-checkpoints must be >= 1"),
    ("threads_negative", lambda t, p: ["--threads", "-1"], r"--threads must be >= 0, got -1"),
    ("momentum_negative", lambda t, p: ["--momentum", "-0.5"], r"--momentum must be >= 0.0, got -0.5"),
    ("weight_decay_inf", lambda t, p: ["--weight-decay", "inf"], r"--weight-decay must be >= 0.0, got inf"),
    ("gamma_zero", lambda t, p: ["--gamma", "0"], r"--gamma must be > 0.0, got 0.0"),
    ("nonfinite_unknown", lambda t, p: ["--nonfinite", "ignore"], r"argument --nonfinite: invalid choice: 'ignore'"),
    ("max_skipped_zero", lambda t, p: ["--max-skipped-steps", "0"], r"--max-skipped-steps must be >= 1"),
    ("progress_seconds_zero", lambda t, p: ["--progress-seconds", "0"], r"--progress-seconds must be > 0.0"),
    ("device_unknown", lambda t, p: ["--device", "tpu"], r"argument --device: invalid choice: 'tpu'"),
    ("device_cuda_missing", lambda t, p: ["--device", "cuda"], r"--device cuda: no CUDA device is available"),
    ("unknown_flag", lambda t, p: ["--learning-rate", "0.1"], r"unrecognized arguments: --learning-rate 0.1"),
    ("eval_images_zero", lambda t, p: ["--max-eval-images", "0"], r"--max-eval-images must be >= 1 \(or unset\)"),
    ("batch_larger_than_data", lambda t, p: ["--batch-size", "128"], r"64 training images are fewer than one"),
    ("ws_backend_unknown", lambda t, p: ["--ws-backend", "triton"], r"argument --ws-backend: invalid choice: 'triton'"),
    ("ws_backend_cuda_graph_on_cpu", lambda t, p: ["--ws-backend", "cuda_graph"], r"--ws-backend cuda_graph: .*CUDA"),
    # YAML
    ("yaml_unknown_key", lambda t, p: yaml_file(t, "learning_rate: 0.1\n"), r"bad\.yaml: unknown key 'learning_rate'"),
    ("yaml_wrong_type", lambda t, p: yaml_file(t, "epochs: ten\n"), r"bad\.yaml: key 'epochs' has invalid value 'ten'"),
    ("yaml_float_for_int", lambda t, p: yaml_file(t, "epochs: 1.5\n"), r"key 'epochs' has invalid value 1\.5"),
    ("yaml_bool_wrong", lambda t, p: yaml_file(t, "nesterov: 3\n"), r"key 'nesterov' has invalid value 3"),
    ("yaml_null_required", lambda t, p: yaml_file(t, "batch_size: null\n"), r"key 'batch_size' cannot be null"),
    ("yaml_not_a_mapping", lambda t, p: yaml_file(t, "- 1\n- 2\n"), r"expected a mapping of keys to values, got list"),
    ("yaml_syntax", lambda t, p: yaml_file(t, "epochs: [1, 2\n"), r"bad\.yaml: not valid YAML"),
    ("yaml_out_of_range", lambda t, p: yaml_file(t, "warmup_epochs: -1\n"), r"--warmup-epochs must be >= 0.0"),
    ("yaml_missing_file", lambda t, p: ["--config", str(t / "nope.yaml")], r"nope\.yaml: cannot read it"),
    # dataset files
    ("cifar_missing", lambda t, p: ["--dataset", "cifar10", "--data-dir", str(t)], r"CIFAR-10"),
    (
        "fashion_truncated_gzip",
        lambda t, p: fashion_dir(t, lambda d: truncate(d / "train-images-idx3-ubyte.gz", 300)),
        r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip stream",
    ),
    (
        "fashion_bad_magic",
        lambda t, p: fashion_dir(
            t, lambda d: rewrite_gz(d / "t10k-labels-idx1-ubyte.gz", lambda b: b"\x01\x02" + b[2:])
        ),
        r"t10k-labels-idx1-ubyte\.gz",
    ),
    (
        "fashion_truncated_data",
        lambda t, p: fashion_dir(t, lambda d: rewrite_gz(d / "train-images-idx3-ubyte.gz", lambda b: b[:-100])),
        r"train-images-idx3-ubyte\.gz",
    ),
    (
        "fashion_label_count",
        lambda t, p: fashion_dir(
            t,
            lambda d: rewrite_gz(d / "train-labels-idx1-ubyte.gz", lambda b: b[:4] + (60).to_bytes(4, "big") + b[8:68]),
        ),
        r"train-labels-idx1-ubyte\.gz",
    ),
    ("unknown_dataset", lambda t, p: ["--dataset", "imagenet21k"], r"--dataset: unknown dataset 'imagenet21k'"),
    # image folders
    ("imagefolder_without_data_dir", lambda t, p: ["--dataset", "imagefolder"], r"--dataset imagefolder needs"),
    ("imagefolder_missing", lambda t, p: imagefolder_args(t / "nowhere"), r"nowhere"),
    (
        "imagefolder_empty_class",
        lambda t, p: (image_folder(t / "f"), (t / "f/train/empty").mkdir(), imagefolder_args(t / "f"))[-1],
        r"empty",
    ),
    (
        "imagefolder_unreadable_image",
        lambda t, p: (
            image_folder(t / "f"),
            (t / "f/train/cat/0.png").write_bytes(b"\x89PNG broken"),
            imagefolder_args(t / "f"),
        )[-1],
        r"0\.png: Pillow cannot decode it",
    ),
    (
        "imagefolder_class_mismatch",
        lambda t, p: (image_folder(t / "f"), shutil.rmtree(t / "f/val/dog"), imagefolder_args(t / "f"))[-1],
        r"different class folders",
    ),
    (
        "imagefolder_no_val",
        lambda t, p: (image_folder(t / "f"), shutil.rmtree(t / "f/val"), imagefolder_args(t / "f"))[-1],
        r"val",
    ),
    (
        "imagefolder_size_zero",
        lambda t, p: [*imagefolder_args(image_folder(t / "f")), "--image-size", "0"],
        r"--image-size must be >= 1",
    ),
    # checkpoints
    ("resume_missing", lambda t, p: ["--resume", str(t / "nope.pt")], r"nope\.pt does not exist"),
    ("resume_a_directory", lambda t, p: ["--resume", str(p)], r"is not a file"),
    (
        "resume_not_a_checkpoint",
        lambda t, p: ["--resume", str(p / "config.yaml")],
        r"config\.yaml is unreadable \(truncated, corrupt or not a checkpoint\): Unsupported operand",
    ),
    (
        "resume_another_model",
        lambda t, p: ["--resume", str(other_checkpoint(t, "--model", "cifar_resnet20_bn"))],
        r"saved from model 'cifar_resnet20_bn' and does not fit this model",
    ),
    (
        "resume_another_dataset",
        lambda t, p: [
            "--resume",
            str(
                other_checkpoint(
                    t, *imagefolder_args(image_folder(t / "f")), "--max-train-images", "8", "--batch-size", "2"
                )
            ),
        ],
        r"shape-mismatched",
    ),
    # output dir
    ("out_dir_is_a_file", lambda t, p: ["--out-dir", str(p / "config.yaml")], r"config\.yaml is not a directory"),
    ("out_dir_under_a_file", lambda t, p: ["--out-dir", str(p / "config.yaml" / "run")], r"cannot write to --out-dir"),
    ("out_dir_holds_a_run", lambda t, p: ["--out-dir", str(p)], r"already holds last\.pt.*--resume auto"),
    (
        "resume_other_run_into_a_run",
        lambda t, p: ["--out-dir", str(p), "--resume", str(other_checkpoint(t))],
        r"would overwrite; continue that run with --resume auto",
    ),
    # model and dataset mismatch
    ("model_unknown", lambda t, p: ["--model", "resnet51"], r"unknown model 'resnet51'; did you mean"),
    (
        "model_needs_larger_images",
        lambda t, p: ["--model", "resnet50_gn_ws"],
        r"--model resnet50_gn_ws needs images of at least 112 px, but --dataset digits has 8 px",
    ),
]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    threads = torch.get_num_threads()
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    import re

    assert code == 2, err[-2000:]
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(("torchws: error: ", "torchws train: error: ")), err
    assert re.search(pattern, err), (pattern, err)


@pytest.mark.parametrize("extra, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(tmp_path, prior, capsys, extra, pattern):
    before = snapshot(prior)
    args = [*BASE, "--out-dir", str(tmp_path / "new"), *extra(tmp_path, prior)]
    capsys.readouterr()
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err, pattern)
    assert snapshot(prior) == before
    new = tmp_path / "new"
    written = [p for p in new.iterdir() if p.name not in ("config.yaml", "metrics.jsonl")] if new.exists() else []
    assert not written and (not (new / "metrics.jsonl").exists() or not (new / "metrics.jsonl").read_text())


@pytest.mark.parametrize("mode, sizes", [("L", ((16, 16),)), ("RGBA", ((16, 16),)), ("RGB", ((16, 12), (9, 20)))],
                         ids=["grayscale", "rgba", "mixed_sizes"])  # fmt: skip
def test_unusual_images_are_converted_and_trained_on(tmp_path, capsys, mode, sizes):
    args = [*BASE, *imagefolder_args(image_folder(tmp_path / "f", mode, sizes)), "--out-dir", str(tmp_path / "run")]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    assert (tmp_path / "run/last.pt").is_file()


def in_child(function: Callable[[], int], err_path: Path) -> int:
    """Run ``function`` in a forked child with stderr sent to ``err_path``; its return value is the exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 99
        try:
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = function()
        except BaseException:
            code = 98
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)  # never back into pytest
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def resume_in_child(run: Path, prepare: Callable[[], None], err: Path) -> int:
    def child() -> int:
        prepare()
        try:
            return main([*BASE, "--epochs", "2", "--resume", "auto", "--out-dir", str(run)])
        except SystemExit as e:
            return int(e.code)

    return in_child(child, err)


def test_full_disk_is_one_line_exit_2_and_loses_nothing(tmp_path, prior):
    """The file-size limit makes every write past 512 bytes fail as a full disk does (EFBIG)."""
    run = tmp_path / "run"
    shutil.copytree(prior, run)
    before = snapshot(run)

    def full() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    code = resume_in_child(run, full, tmp_path / "err")
    assert_one_line_error(code, (tmp_path / "err").read_text(), r"cannot write to --out-dir .*: File too large")
    assert snapshot(run) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to the user nobody to make a dir read-only even for root")
def test_read_only_out_dir_is_one_line_exit_2_and_loses_nothing(prior):
    base = Path(tempfile.mkdtemp(prefix="torchws-readonly-"))  # outside pytest's private tmp (0700)
    try:
        base.chmod(0o755)
        run = base / "run"
        shutil.copytree(prior, run)
        for path in run.iterdir():
            path.chmod(0o444)
        run.chmod(0o555)
        before = snapshot(run)
        err = base / "err"
        err.touch(mode=0o666)
        err.chmod(0o666)
        code = resume_in_child(run, lambda: os.setuid(65534), err)
        assert_one_line_error(code, err.read_text(), r"cannot write to --out-dir .*: Permission denied")
        assert snapshot(run) == before
    finally:
        shutil.rmtree(base, ignore_errors=True)
