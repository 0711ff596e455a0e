"""TrainConfig: dataclass -> flags, YAML defaults, flag overrides, unknown keys, saved round trip; lr scaling and
schedules at exact steps."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from torchws.train import ConfigError, LRSchedule, TrainConfig, load_yaml, parse_config, save_config, scaled_lr
from torchws.train.config import add_config_flags


def test_every_field_is_a_flag_with_its_help():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    text = parser.format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text
    assert "--no-scale-lr" in text and "--nesterov" in text and "--no-nesterov" in text
    assert "SGD weight decay" in text  # help comes from the field metadata


def test_flags_parse_to_typed_values():
    cfg = parse_config(["--batch-size", "4", "--lr", "0.5", "--milestones", "3", "7", "--nesterov", "--no-scale-lr",
                        "--max-steps", "12", "--schedule", "cosine", "--data-dir", "/x"])  # fmt: skip
    assert cfg.batch_size == 4 and cfg.lr == 0.5 and cfg.milestones == (3, 7)
    assert cfg.nesterov is True and cfg.scale_lr is False and cfg.max_steps == 12 and cfg.schedule == "cosine"
    assert cfg.data_dir == "/x"
    assert parse_config(["--max-steps", "none"]).max_steps is None
    # untouched fields keep the dataclass defaults
    assert dataclasses.replace(cfg, batch_size=64, lr=0.1, milestones=(30, 60), nesterov=False, scale_lr=True,
                               max_steps=None, schedule="step", data_dir=None) == TrainConfig()  # fmt: skip


def test_bad_choice_and_type_exit_2(capsys):
    with pytest.raises(SystemExit, match="^2$"):
        parse_config(["--schedule", "linear"])
    assert "invalid choice: 'linear'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        parse_config(["--batch-size", "two"])
    assert "invalid int value" in capsys.readouterr().err


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch-size: 8\nepochs: 3\nmilestones: [1, 2]\nnesterov: true\nlr: 1\n")
    cfg = parse_config(["--config", str(path), "--epochs", "5"])
    assert (cfg.batch_size, cfg.epochs, cfg.milestones, cfg.nesterov) == (8, 5, (1, 2), True)
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    cfg = parse_config(["--config", str(path), "--no-nesterov"])
    assert cfg.nesterov is False and cfg.epochs == 3


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'") as e:
        load_yaml(path)
    message = str(e.value)
    assert "learning_rate" in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("epochs: two\n", "epochs"),
        ("nesterov: 3\n", "nesterov"),
        ("- 1\n- 2\n", "mapping"),
        ("epochs: [1\n", "not valid YAML"),
    ],
)
def test_bad_yaml_values(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_yaml(path)


def test_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--batch-size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="--milestones"):
        TrainConfig(milestones=(5, 2)).validate()
    with pytest.raises(ConfigError, match="--augment"):
        TrainConfig(augment="mixup").validate()


def test_saved_config_round_trip(tmp_path):
    cfg = TrainConfig(model="cifar_resnet20_bn", batch_size=2, milestones=(1, 4), max_steps=9, nesterov=True,
                      data_dir=None, warmup_epochs=0.5)  # fmt: skip
    save_config(cfg, tmp_path / "config.yaml")
    assert TrainConfig.from_dict(load_yaml(tmp_path / "config.yaml")) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        TrainConfig.from_dict({"bogus": 1}, "ckpt")


def test_a_retired_key_loads_from_a_saved_config_and_is_refused_in_a_hand_written_one(tmp_path):
    """``ws_deferred`` was written by earlier versions into every config.yaml and checkpoint: those still load (a run
    of an earlier version resumes, a checkpoint is analyzed); a --config file that sets it names the key and why."""
    saved = {**TrainConfig(model="cifar_resnet20_gn").to_dict(), "ws_deferred": True}
    assert TrainConfig.from_dict(saved) == TrainConfig(model="cifar_resnet20_gn")
    path = tmp_path / "old.yaml"
    path.write_text("model: cifar_resnet20_gn\nws_deferred: true\n")
    assert load_yaml(path, saved=True) == {"model": "cifar_resnet20_gn"}
    with pytest.raises(
        ConfigError,
        match=r"old\.yaml: key 'ws_deferred' is no longer used \(the deferred WS backward "
        r"was removed; --ws-backend picks the engine of the WS pass\); remove it",
    ):
        load_yaml(path)


def test_linear_lr_scaling():
    assert scaled_lr(0.1, 32, 1, 8, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 1, 1, 8, 256) == pytest.approx(0.1 / 32)
    assert scaled_lr(0.1, 2, 4, 2, 256) == pytest.approx(0.1 * 16 / 256)


def test_step_schedule_with_warmup_exact_values():
    s = LRSchedule(peak_lr=0.8, total_steps=100, schedule="step", warmup_steps=4, milestones=[10, 20], gamma=0.1)
    assert [s.lr_at(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    assert s.lr_at(9) == pytest.approx(0.8)
    assert s.lr_at(10) == pytest.approx(0.08)
    assert s.lr_at(19) == pytest.approx(0.08)
    assert s.lr_at(20) == pytest.approx(0.008)


def test_cosine_schedule_exact_values():
    s = LRSchedule(peak_lr=1.0, total_steps=12, schedule="cosine", warmup_steps=2)
    assert s.lr_at(0) == pytest.approx(0.5) and s.lr_at(1) == pytest.approx(1.0)
    assert s.lr_at(2) == pytest.approx(1.0)
    assert s.lr_at(7) == pytest.approx(0.5)  # halfway through the 10 decay steps
    assert s.lr_at(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert s.lr_at(12) == pytest.approx(0.0, abs=1e-12)


def test_schedule_applies_to_optimizer_and_resumes():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=123.0)
    s = LRSchedule(peak_lr=1.0, total_steps=10, schedule="step", milestones=[2], gamma=0.5)
    assert [s.apply(opt) for _ in range(3)] == [1.0, 1.0, 0.5] and opt.param_groups[0]["lr"] == 0.5
    t = LRSchedule(peak_lr=1.0, total_steps=10, schedule="step", milestones=[2], gamma=0.5)
    t.load_state_dict(s.state_dict())
    assert t.apply(opt) == s.lr_at(3)


def test_shipped_yaml_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files, "configs/*.yaml missing"
    for path in files:
        cfg = parse_config(["--config", str(path)])
        assert cfg.model and cfg.out_dir.startswith("runs/"), path
