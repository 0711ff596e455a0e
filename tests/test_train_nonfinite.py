"""A NaN or Inf loss or gradient never reaches the weights. ``--nonfinite stop`` writes last.pt as of the step
before and names the step and the first parameter hit; ``--nonfinite skip`` leaves weights and optimizer state as
they were, counts the step, and stops after ``--max-skipped-steps`` in a row. Faults come from a NaN batch sent
through the real forward and backward, an Inf put into one gradient, and a zeroed filter under every WS preset."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_engine import (  # noqa: F401 (one_thread, registered_test_models: autouse fixtures)
    DROPOUT_MODEL,
    assert_same_optimizer_state,
    assert_same_params,
    one_thread,
    registered_test_models,
    run_trainer,
    tiny_cfg,
    tiny_splits,
)

from torchws.layers import WSConv2d
from torchws.models import register_model, unregister_model
from torchws.presets import PRESETS
from torchws.train import engine as engine_module
from torchws.train import load_checkpoint, train
from torchws.train.distributed import DistInfo
from torchws.train.engine import Trainer
from torchws.train.errors import NonFiniteError
from torchws.train.metrics import read_metrics


def recipe(tmp_path, **overrides):
    return tiny_cfg(tmp_path, **{**dict(model=DROPOUT_MODEL, schedule="step", milestones=(1,)), **overrides})


def inject(monkeypatch, steps: set[int], fault: str = "nan_batch", parameter: str = "") -> None:
    """At the given optimizer steps (1-based): ``nan_batch`` sends NaN images through the real step; ``inf_grad``
    runs the real step, then puts an Inf into ``parameter``'s gradient."""
    real, calls = engine_module.train_step, [0]

    def step(model, wrapped, micro, stats, **kwargs):
        calls[0] += 1
        if calls[0] in steps and fault == "nan_batch":
            micro = [(torch.full_like(images, math.nan), labels) for images, labels in micro]
        real(model, wrapped, micro, stats, **kwargs)
        if calls[0] in steps and fault == "inf_grad":
            dict(model.named_parameters())[parameter].grad.view(-1)[0] = math.inf

    monkeypatch.setattr(engine_module, "train_step", step)


def clean_run(tmp_path, steps: int, **overrides) -> Trainer:
    return run_trainer(recipe(tmp_path, max_steps=steps, **overrides), tiny_splits())


def all_finite(state: dict) -> bool:
    return all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point())


def test_stop_names_the_step_and_the_first_parameter_and_keeps_the_weights_before(tmp_path, monkeypatch):
    inject(monkeypatch, {4})
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step 4 \(epoch 1, batch 4\): loss nan, "
                       r"first parameter with a non-finite gradient: 0\.weight; the step was not applied"):  # fmt: skip
        train(recipe(tmp_path / "nan"), splits=tiny_splits(), echo=False)
    saved = load_checkpoint(tmp_path / "nan/run/last.pt")
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"], saved["scheduler"]["step"]) == (3, 0, 3, 3)
    reference = clean_run(tmp_path / "clean", 3)  # the weights are exactly those after step 3
    assert_same_params(saved["model"], reference.model.state_dict())
    assert_same_optimizer_state(saved["optimizer"], reference.optimizer.state_dict())
    stopped = read_metrics(tmp_path / "nan/run/metrics.jsonl", "nonfinite")
    assert [(r["step"], r["stopped"]) for r in stopped] == [(4, True)]
    monkeypatch.undo()  # with clean data the run goes on from there (the RNG states are those after the forward of
    resumed = run_trainer(recipe(tmp_path / "nan", resume="auto"), tiny_splits())  # step 4: other dropout masks)
    assert resumed.step == 12 and all_finite(resumed.model.state_dict())


def test_stop_names_the_first_parameter_whose_gradient_is_not_finite(tmp_path, monkeypatch):
    inject(monkeypatch, {2}, fault="inf_grad", parameter="4.weight")  # the second conv; the loss is finite
    with pytest.raises(NonFiniteError, match=r"at step 2 .*: loss \d\.\d+, first parameter with a non-finite "
                       r"gradient: 4\.weight"):  # fmt: skip
        train(recipe(tmp_path), splits=tiny_splits(), echo=False)
    assert all_finite(load_checkpoint(tmp_path / "run/last.pt")["model"])


def test_skip_leaves_weights_and_optimizer_state_untouched_and_counts(tmp_path, monkeypatch):
    inject(monkeypatch, {4})
    skipped = run_trainer(recipe(tmp_path / "skip", nonfinite="skip", max_steps=4), tiny_splits())
    reference = clean_run(tmp_path / "clean", 3)
    assert skipped.step == 4 and skipped.guard.skipped == 1
    assert_same_params(skipped.model, reference.model)
    a, b = skipped.optimizer.state_dict(), reference.optimizer.state_dict()
    for group in a["param_groups"] + b["param_groups"]:
        group.pop("lr")  # the lr of the step that was skipped, and of the one before
    assert_same_optimizer_state(a, b)


def test_skip_goes_on_after_isolated_bad_steps_and_records_them(tmp_path, monkeypatch):
    inject(monkeypatch, {2, 3, 8})  # two in a row, then one: never 3 in a row
    summary = train(recipe(tmp_path, nonfinite="skip", max_skipped_steps=3), splits=tiny_splits(), echo=False)
    assert summary["steps"] == 12 and summary["skipped_steps"] == 3
    epochs = read_metrics(tmp_path / "run/metrics.jsonl", "epoch")
    assert [r["skipped_steps"] for r in epochs] == [2, 3]  # counted over the run, saved in each record
    assert all(math.isfinite(r["train_loss"]) for r in epochs)  # skipped steps stay out of the epoch's loss
    state = load_checkpoint(tmp_path / "run/last.pt")
    assert state["nonfinite"] == {"skipped": 3, "in_row": 0} and all_finite(state["model"])


def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path, monkeypatch):
    inject(monkeypatch, {4, 5, 6})
    with pytest.raises(NonFiniteError, match=r"3 steps in a row had a non-finite loss or gradient "
                       r"\(--max-skipped-steps 3\), the last one at step 6 \(epoch 1, batch 6\)"):  # fmt: skip
        train(recipe(tmp_path, nonfinite="skip", max_skipped_steps=3), splits=tiny_splits(), echo=False)
    state = load_checkpoint(tmp_path / "run/last.pt")
    assert state["step"] == 5 and state["nonfinite"]["skipped"] == 3
    assert_same_params(state["model"], clean_run(tmp_path / "clean", 3).model.state_dict())


def test_nonfinite_stop_exits_3_with_one_line(tmp_path, monkeypatch, capsys):
    from torchws.cli import main

    inject(monkeypatch, {1})
    code = main(["train", "--dataset", "digits", "--model", DROPOUT_MODEL, "--batch-size", "64", "--epochs", "1",
                 "--out-dir", str(tmp_path / "run"), "--no-progress", "--no-tensorboard", "--no-plot",
                 "--device", "cpu", "--max-eval-images", "10"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1
    assert err.startswith("torchws: error: non-finite loss or gradient at step 1")


# ---------------------------------------------------------------- a zeroed filter under each WS preset


def zero_filter_model(preset: str, request) -> str:
    """A tiny net, registered for one test, whose first WS conv has filter 0 set to zero (a constant filter)."""
    name = f"tiny_zero_filter_{preset}"

    def build(*, num_classes: int, in_chans: int = 1) -> torch.nn.Module:
        conv = WSConv2d(in_chans, 8, 3, padding=1, preset=preset)
        with torch.no_grad():
            conv.weight[0].zero_()
        return torch.nn.Sequential(conv, torch.nn.GroupNorm(2, 8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(8, num_classes))  # fmt: skip

    register_model(name, family="test", norm="gn", ws=True, input_size=(1, 8, 8), num_classes=4)(build)
    request.addfinalizer(lambda: unregister_model(name))  # out of the registry again after the test
    return name


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_zeroed_filter_under_each_preset(tmp_path, request, preset, policy):
    """Every preset trains through a zero filter (its gradient is finite: docs/numerics.md), under either policy,
    with no step skipped, and the weights on disk are finite."""
    model = zero_filter_model(preset, request)
    cfg = recipe(tmp_path, model=model, nonfinite=policy, max_skipped_steps=2, epochs=1)
    trainer = Trainer(cfg.validate(), DistInfo(), torch.device("cpu"), tiny_splits(), echo=False)
    trainer.run()
    assert trainer.step == 6 and trainer.guard.skipped == 0
    assert all_finite(load_checkpoint(tmp_path / "run/last.pt")["model"])
