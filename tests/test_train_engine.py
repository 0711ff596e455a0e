"""Training engine on tiny data: end-to-end run and its files, exact resume (epoch boundary and mid-epoch),
gradient accumulation equivalence, atomic checkpoints, and the typed errors for bad runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from torchws.data import TensorSplits
from torchws.layers import WSConv2d
from torchws.models import list_models, register_model, unregister_model
from torchws.train import CheckpointError, ConfigError, RunDirError, TrainConfig, atomic_save, load_checkpoint, train
from torchws.train.checkpoint import capture_rng, restore_rng
from torchws.train.distributed import DistInfo
from torchws.train.engine import Trainer
from torchws.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, two spinning OpenMP threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DROPOUT_MODEL = "tiny_ws_dropout_net"  # draws from torch's global RNG every step: resume must restore it


def tiny_ws_dropout_net(*, num_classes: int, in_chans: int = 1) -> torch.nn.Module:
    """WS conv, GN, dropout, conv, linear: a few hundred parameters, and its training depends on the global RNG."""
    return torch.nn.Sequential(WSConv2d(in_chans, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
                               torch.nn.Dropout(0.3), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, num_classes))  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def registered_test_models():
    """The test-only model is in the registry while a module that uses it runs, and out of it after (other tests
    check the list of registered names)."""
    added = DROPOUT_MODEL not in list_models()
    if added:
        register_model(DROPOUT_MODEL, family="test", norm="gn", ws=True, input_size=(1, 8, 8),
                       num_classes=4)(tiny_ws_dropout_net)  # fmt: skip
    yield
    if added:
        unregister_model(DROPOUT_MODEL)


def tiny_splits(n_train: int = 48, n_test: int = 24, size: int = 8, seed: int = 0) -> TensorSplits:
    """Random uint8 images whose class is encoded in their brightness (learnable), 1 channel."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 4, (n,), generator=g)
        noise = torch.randint(0, 60, (n, 1, size, size), generator=g)
        return (noise + labels.view(-1, 1, 1, 1) * 60).to(torch.uint8), labels

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return TensorSplits(xtr, ytr, xte, yte, 4, ["a", "b", "c", "d"], (0.45,), (0.25,), "tiny")


def tiny_cfg(tmp_path: Path, **overrides) -> TrainConfig:
    base = dict(model="cifar_resnet20_gn_ws", dataset="tiny", batch_size=8, epochs=2, lr=0.4, schedule="cosine",
                warmup_epochs=0.5, out_dir=str(tmp_path / "run"), progress=False, tensorboard=False, plot=False,
                deterministic=True, device="cpu", log_every=1)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def run_trainer(cfg: TrainConfig, splits: TensorSplits) -> Trainer:
    trainer = Trainer(cfg.validate(), DistInfo(), torch.device("cpu"), splits, echo=False)
    trainer.run()
    return trainer


def assert_same_params(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    """Same keys in the same order, and every tensor bit for bit equal."""
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert list(sa) == list(sb), "the two state dicts hold different keys"
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    """Two optimizer state dicts: the same params per group, hyperparameters and per-param buffers, bit for bit."""
    assert a["param_groups"] == b["param_groups"], "the param groups differ"
    assert sorted(a["state"]) == sorted(b["state"]), "the optimizers hold state for different params"
    assert len(a["state"]) > 0, "no optimizer state to compare"
    for key in a["state"]:
        assert sorted(a["state"][key]) == sorted(b["state"][key]), key
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]) if torch.is_tensor(value) else value == \
                b["state"][key][name], (key, name)  # fmt: skip


def test_end_to_end_writes_run_files_and_learns(tmp_path):
    splits = tiny_splits()
    summary = train(tiny_cfg(tmp_path, epochs=3, plot=True), splits=splits, echo=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    epochs = read_metrics(run / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and [r["step"] for r in epochs] == [6, 12, 18]
    assert len(read_metrics(run / "metrics.jsonl", "train_step")) == 18
    assert summary["steps"] == 18 and summary["final_test_acc"] == epochs[-1]["test_acc"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    state = load_checkpoint(run / "last.pt")
    assert state["config"]["model"] == "cifar_resnet20_gn_ws" and state["epoch"] == 3 and state["step"] == 18
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "history"}
    assert json.loads((run / "summary.json").read_text())["steps"] == 18


@pytest.mark.parametrize("model", [DROPOUT_MODEL, "cifar_resnet20_gn_ws"])
def test_resume_is_bit_exact(tmp_path, model):
    """train 2 epochs == train 1 epoch, resume, train 1 more (step schedule: its shape does not depend on the
    number of epochs, so the 1-epoch run uses the same lrs as the first half of the 2-epoch run). The dropout model
    draws from torch's global RNG, so the resume must restore it."""
    splits = tiny_splits()
    recipe = dict(schedule="step", milestones=(1,), gamma=0.5, model=model)
    straight = run_trainer(tiny_cfg(tmp_path / "a", epochs=2, **recipe), splits)
    run_trainer(tiny_cfg(tmp_path / "b", epochs=1, **recipe), splits)
    resumed = run_trainer(tiny_cfg(tmp_path / "b", epochs=2, resume="auto", **recipe), splits)
    assert resumed.step == straight.step == 12
    assert_same_params(straight.model, resumed.model)
    assert_same_optimizer_state(straight.optimizer.state_dict(), resumed.optimizer.state_dict())
    # metrics.jsonl of the resumed run reads as one run
    assert [r["epoch"] for r in read_metrics(tmp_path / "b/run/metrics.jsonl", "epoch")] == [1, 2]


@pytest.mark.parametrize("model", [DROPOUT_MODEL, "cifar_resnet20_gn_ws"])
def test_resume_mid_epoch_is_bit_exact(tmp_path, model):
    splits = tiny_splits()
    recipe = dict(epochs=2, augment="crop_flip", schedule="step", milestones=(1,), gamma=0.5, model=model)
    straight = run_trainer(tiny_cfg(tmp_path / "a", **recipe), splits)
    first = run_trainer(tiny_cfg(tmp_path / "b", max_steps=8, **recipe), splits)
    assert first.step == 8 and load_checkpoint(tmp_path / "b/run/last.pt")["batch_in_epoch"] == 2
    resumed = run_trainer(tiny_cfg(tmp_path / "b", resume=str(tmp_path / "b/run/last.pt"), **recipe), splits)
    assert resumed.step == 12
    assert_same_params(straight.model, resumed.model)
    assert_same_optimizer_state(straight.optimizer.state_dict(), resumed.optimizer.state_dict())


def test_same_params_checks_catch_missing_keys_and_differences():
    a = torch.nn.Linear(2, 2)
    b = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(AssertionError, match="different keys"):
        assert_same_params(a, b)
    c = torch.nn.Linear(2, 2)
    with pytest.raises(AssertionError, match="weight"):
        assert_same_params(a, c)
    state = {"param_groups": [{"params": [0]}], "state": {0: {"momentum_buffer": torch.zeros(2)}}}
    with pytest.raises(AssertionError, match="momentum_buffer"):
        assert_same_optimizer_state(state, {**state, "state": {0: {"momentum_buffer": torch.ones(2)}}})
    with pytest.raises(AssertionError, match="state for different params"):
        assert_same_optimizer_state(state, {**state, "state": {}})


@pytest.mark.parametrize(
    "model, once", [("cifar_resnet20_gn_ws", True), ("cifar_resnet20_gn_ws", False), ("cifar_resnet20_gn", True)]
)
def test_accumulation_matches_one_big_batch(tmp_path, model, once):
    """2 micro-batches of 4 accumulate the gradient of one batch of 8 (GN: no batch dependence): after one step
    the momentum buffers (= gradient + weight decay) agree to fp32 rounding (WS's backward divides by the filters'
    std, which amplifies rounding to a few 1e-6; a lost micro-batch or a wrong 1/k would be off by O(gradient))."""
    splits = tiny_splits(n_train=16)
    common = dict(model=model, epochs=1, max_steps=1, warmup_epochs=0.0, schedule="constant")
    big = run_trainer(tiny_cfg(tmp_path / "big", batch_size=8, **common), splits)
    acc = run_trainer(
        tiny_cfg(tmp_path / "acc", batch_size=4, accum_steps=2, ws_accumulate_once=once, **common), splits
    )
    assert acc.schedule.peak_lr == big.schedule.peak_lr
    a, b = big.optimizer.state_dict()["state"], acc.optimizer.state_dict()["state"]
    assert len(a) == len(list(big.model.parameters()))
    for key in a:
        torch.testing.assert_close(a[key]["momentum_buffer"], b[key]["momentum_buffer"], rtol=1e-4, atol=1e-5)


def test_existing_checkpoints_are_not_overwritten(tmp_path):
    splits = tiny_splits()
    cfg = tiny_cfg(tmp_path, epochs=1)
    train(cfg, splits=splits, echo=False)
    last = tmp_path / "run/last.pt"
    before = last.read_bytes()
    with pytest.raises(RunDirError, match="--resume auto"):
        train(cfg, splits=splits, echo=False)
    assert last.read_bytes() == before
    train(tiny_cfg(tmp_path, epochs=1, overwrite=True, seed=1), splits=splits, echo=False)
    assert last.read_bytes() != before


def test_bad_checkpoints_raise_typed_errors(tmp_path):
    splits = tiny_splits()
    train(tiny_cfg(tmp_path, epochs=1, model="cifar_resnet20_bn"), splits=splits, echo=False)
    last = tmp_path / "run/last.pt"
    with pytest.raises(CheckpointError, match="cifar_resnet20_bn"):
        train(tiny_cfg(tmp_path / "x", resume=str(last)), splits=splits, echo=False)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        train(tiny_cfg(tmp_path / "y", resume=str(truncated)), splits=splits, echo=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_cfg(tmp_path / "z", resume=str(tmp_path / "nope.pt")), splits=splits, echo=False)
    assert not (tmp_path / "x/run").exists() and not (tmp_path / "y/run").exists()  # nothing written


def test_unknown_model_and_small_images(tmp_path):
    splits = tiny_splits()
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        train(tiny_cfg(tmp_path, model="nope"), splits=splits, echo=False)
    with pytest.raises(ConfigError, match="at least 112 px"):
        train(tiny_cfg(tmp_path, model="resnet50_gn_ws"), splits=splits, echo=False)
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        train(tiny_cfg(tmp_path, batch_size=64), splits=splits, echo=False)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"v": torch.tensor([1.0])}, path)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["v"].item() == 1.0
    assert os.listdir(tmp_path) == ["last.pt"]  # the temp file is gone


def test_rng_capture_restore_round_trip():
    import random

    import numpy as np

    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_imagefolder_bf16_channels_last(tmp_path):
    """The image-folder path (DataLoader + sampler) with bf16 autocast and channels_last runs and writes its files."""
    pil = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = (torch.randint(0, 80, (20, 20, 3), generator=g) + 120 * c).to(torch.uint8).numpy()
                pil.fromarray(pixels).save(folder / f"{i}.png")
    cfg = tiny_cfg(tmp_path, dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=16, batch_size=2,
                   workers=0, epochs=1, bf16=True, channels_last=True, deterministic=False)  # fmt: skip
    summary = train(cfg, echo=False)
    assert summary["steps"] == 4 and summary["history"][-1]["test_acc"] is not None
    assert load_checkpoint(tmp_path / "run/last.pt")["config"]["dataset"] == "imagefolder"
    with pytest.raises(ConfigError, match="at least 112 px"):
        train(tiny_cfg(tmp_path / "x", dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=16,
                       model="resnet18_gn_ws"), echo=False)  # fmt: skip


@pytest.mark.parametrize("backend,expected", [("off", None), ("auto", "numba"), ("torch", "torch"), ("numba", "numba")])
def test_ws_backend_option_selects_the_engine_of_the_model_level_pass(tmp_path, backend, expected):
    from torchws.fast import find_handle

    trainer = Trainer(tiny_cfg(tmp_path, ws_backend=backend, max_steps=1).validate(), DistInfo(), torch.device("cpu"),
                      tiny_splits(), echo=False)  # fmt: skip
    handle = find_handle(trainer.model)
    assert (handle.engine.name if handle else None) == expected


@pytest.mark.parametrize(
    "options", [{"accum_steps": 2}, {"channels_last": True, "max_steps": 4}], ids=["accumulation", "channels_last"]
)
def test_the_engine_the_trainer_enables_trains_like_per_layer_ws(tmp_path, options):
    """The WS pass the trainer turns on (auto: the numba engine on this CPU) against every layer computing its own
    weight (--ws-backend off): the same losses, accuracies (evaluated after each epoch) and weights (resume with the
    default engine is bit-exact: test_resume_is_bit_exact). Runs stay short where the two drift apart by chaos, not
    error: at lr 0.4 this tiny net turns the 1e-7 float32 rounding difference of the two WS computations into
    different test accuracies after 20 steps. Under bf16 autocast the same 1e-7 moves the gradients by 10-50% (per
    layer against per layer with weights changed by 1e-7 just the same), too much for a trainer-level comparison; the
    engines are compared under autocast in tests/fast/test_equivalence.py."""
    summaries, weights = {}, {}
    for backend in ("auto", "off"):
        cfg = tiny_cfg(tmp_path / backend, ws_backend=backend, batch_size=4, **options)
        summaries[backend] = train(cfg, splits=tiny_splits(), echo=False)
        weights[backend] = load_checkpoint(tmp_path / backend / "run/last.pt")["model"]
    for got, want in zip(summaries["auto"]["history"], summaries["off"]["history"], strict=True):
        assert got["test_acc"] == want["test_acc"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    for name, want in weights["off"].items():
        torch.testing.assert_close(weights["auto"][name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_an_unknown_backend_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--ws-backend must be one of auto, torch, numba, cuda_graph, off, got 't"):
        train(tiny_cfg(tmp_path, ws_backend="triton", max_steps=1), splits=tiny_splits(), echo=False)
    assert not (tmp_path / "run").exists()


def test_numba_backend_without_numba_is_a_config_error(tmp_path, monkeypatch):
    from torchws.fast import engines

    monkeypatch.setattr(engines, "numba_status", lambda: "not installed (pip install 'torchws[cpu]')")
    with pytest.raises(ConfigError, match="--ws-backend numba: .*pip install 'torchws\\[cpu\\]'"):
        train(tiny_cfg(tmp_path, ws_backend="numba", max_steps=1), splits=tiny_splits(), echo=False)
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file_is_a_run_dir_error(tmp_path):
    """It used to fail with a FileExistsError traceback."""
    splits = tiny_splits()
    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(RunDirError, match="is not a directory"):
        train(tiny_cfg(tmp_path, out_dir=str(tmp_path / "file"), max_steps=1), splits=splits, echo=False)


def test_resume_uses_the_current_optimizer_flags(tmp_path):
    """The current flags define the run on resume: momentum / weight decay / nesterov given now win over the
    values stored in the checkpoint's optimizer state."""
    splits = tiny_splits()
    run_trainer(tiny_cfg(tmp_path, epochs=1, momentum=0.9, weight_decay=1e-4), splits)
    resumed = run_trainer(tiny_cfg(tmp_path, epochs=2, resume="auto", momentum=0.5, weight_decay=0.0,
                                   nesterov=True), splits)  # fmt: skip
    decay, no_decay = resumed.optimizer.param_groups
    assert (decay["momentum"], decay["weight_decay"], decay["nesterov"]) == (0.5, 0.0, True)
    assert (no_decay["momentum"], no_decay["weight_decay"], no_decay["nesterov"]) == (0.5, 0.0, True)


def test_fewer_eval_images_than_ranks_is_a_config_error(tmp_path):
    """--max-eval-images 1 under 2 ranks left rank 1 an empty test shard: a ValueError traceback from TensorLoader."""
    from torchws.train.inputs import build_inputs

    cfg = tiny_cfg(tmp_path, max_eval_images=1).validate()
    with pytest.raises(ConfigError, match="--max-eval-images"):
        build_inputs(cfg, DistInfo(rank=1, world_size=2, enabled=True), torch.device("cpu"), tiny_splits())
