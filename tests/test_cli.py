"""`torchws` CLI: listing verbs, a tiny train run, and bad input -> one line on stderr and exit code 2, with
existing checkpoints untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from test_train_engine import one_thread  # noqa: F401 (the autouse fixture, shared)

from torchws.cli import main

TINY = ["--dataset", "digits", "--model", "cifar_resnet20_gn_ws", "--batch-size", "16", "--max-steps", "2",
        "--epochs", "1", "--max-eval-images", "64", "--no-progress", "--no-tensorboard", "--no-plot",
        "--device", "cpu"]  # fmt: skip


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchws: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_models_and_datasets_lists(capsys):
    code, out, _ = run_cli(capsys, "models", "*_gn_ws")
    assert code == 0 and "resnet50_gn_ws" in out and "cifar_resnet20_gn_ws" in out and "_bn " not in out
    code, out, _ = run_cli(capsys, "datasets")
    assert code == 0 and "fashion_mnist    1 x 28 x 28 px, 10 classes" in out and "imagefolder" in out


def test_tiny_train_and_resume(capsys, tmp_path):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", *TINY, "--out-dir", str(run))
    assert code == 0 and "test_acc" in out and (run / "last.pt").is_file() and (run / "config.yaml").is_file()
    code, out, _ = run_cli(capsys, "train", *TINY, "--out-dir", str(run), "--resume", "auto", "--max-steps", "3")
    assert code == 0 and torch.load(run / "last.pt", weights_only=True)["step"] == 3


def test_unknown_names_list_the_valid_ones(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, "--model", "resnet20_gnws", "--out-dir", str(tmp_path))
    assert_user_error(code, err, "unknown model 'resnet20_gnws'", "cifar_resnet20_gn_ws", "resnet50_bn")
    code, _, err = run_cli(capsys, "train", *TINY, "--dataset", "mnist", "--out-dir", str(tmp_path))
    assert_user_error(code, err, "unknown dataset 'mnist'", "fashion_mnist", "cifar10")


def test_images_too_small_for_imagenet_models(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, "--model", "resnet50_gn_ws", "--out-dir", str(tmp_path))
    assert_user_error(code, err, "at least 112 px", "8 px")


def test_data_dir_in_wrong_format(capsys, tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (tmp_path / name).write_bytes(b"not an idx file")
    code, _, err = run_cli(capsys, "train", *TINY, "--dataset", "fashion_mnist", "--data-dir", str(tmp_path),
                           "--out-dir", str(tmp_path / "run"))  # fmt: skip
    assert_user_error(code, err, "not an IDX file")
    assert not (tmp_path / "run").exists()


def test_missing_dataset_says_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHWS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "train", *TINY, "--dataset", "cifar10", "--data-dir", str(tmp_path),
                           "--out-dir", str(tmp_path / "run"))  # fmt: skip
    assert_user_error(code, err, "not found", "cifar-10-python.tar.gz")
    from torchws.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "none")
    code, _, err = run_cli(capsys, "demo", "--budget", "tiny", "--out-dir", str(tmp_path / "demo"))
    assert_user_error(code, err, "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist")


def test_bad_checkpoints_and_existing_run_dir(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--model", "cifar_resnet20_bn", "--out-dir", str(run))[0] == 0
    last = run / "last.pt"
    before = last.read_bytes()
    code, _, err = run_cli(capsys, "train", *TINY, "--out-dir", str(run))
    assert_user_error(code, err, "already holds last.pt", "--resume auto", "--overwrite")
    code, _, err = run_cli(capsys, "train", *TINY, "--out-dir", str(run), "--resume", "auto")  # gn_ws vs bn
    assert_user_error(code, err, "saved from model 'cifar_resnet20_bn'", "unexpected keys")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(before[:1000])
    code, _, err = run_cli(capsys, "train", *TINY, "--out-dir", str(tmp_path / "r2"), "--resume", str(truncated))
    assert_user_error(code, err, "is unreadable (truncated, corrupt or not a checkpoint)")
    assert last.read_bytes() == before


def test_resume_from_another_run_into_a_run_dir(capsys, tmp_path):
    """--resume PATH of another run used to overwrite the out-dir's run; now one line, exit 2, nothing touched."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(capsys, "train", *TINY, "--out-dir", str(first))[0] == 0
    assert run_cli(capsys, "train", *TINY, "--out-dir", str(second), "--seed", "1")[0] == 0
    before = {p.name: p.read_bytes() for p in second.iterdir() if p.is_file()}
    code, _, err = run_cli(capsys, "train", *TINY, "--out-dir", str(second), "--resume", str(first / "last.pt"),
                           "--max-steps", "3")  # fmt: skip
    assert_user_error(code, err, f"--out-dir {second} already holds last.pt", str(first / "last.pt"), "--overwrite")
    code, _, err = run_cli(capsys, "train", *TINY, "--out-dir", str(second), "--resume", str(tmp_path / "gone.pt"))
    assert_user_error(code, err, f"checkpoint {tmp_path / 'gone.pt'} does not exist")
    assert {p.name: p.read_bytes() for p in second.iterdir() if p.is_file()} == before
    code, _, _ = run_cli(capsys, "train", *TINY, "--out-dir", str(second), "--resume", str(second / "last.pt"),
                         "--max-steps", "3")  # fmt: skip
    assert code == 0 and torch.load(second / "last.pt", weights_only=True)["step"] == 3


def test_unknown_yaml_key(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1\nbatchsize: 4\n")
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert_user_error(code, err, "unknown key 'batchsize'", str(path))


def test_bad_demo_budget(capsys):
    code, _, err = run_cli(capsys, "demo", "--budget", "huge")
    assert_user_error(code, err, "--budget")


def test_console_script_prints_no_traceback(tmp_path):
    script = Path(sys.executable).parent / "torchws"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from torchws.cli import main; "
                                                 "sys.exit(main())"]  # fmt: skip
    result = subprocess.run([*cmd, "train", "--model", "nope", "--out-dir", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([sys.executable, "-m", "torchws.train", "--help"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0 and "--ws-accumulate-once" in result.stdout


def test_missing_optional_package_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    import sys

    from torchws import cli

    for name in ("sklearn", "sklearn.datasets"):  # importing them now raises ModuleNotFoundError
        monkeypatch.setitem(sys.modules, name, None)
    code = cli.main(["train", "--dataset", "digits", "--model", "cifar_resnet20_gn_ws", "--max-steps", "1",
                     "--out-dir", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "scikit-learn" in err[0], err
