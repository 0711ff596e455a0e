"""DDP on CPU (gloo) with 2 processes: ranks stay identical, and GN+WS has no batch dependence across processes
(2 processes x 1 image == 1 process x 2 images for one SGD step) while BN has."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from torchws.data import TensorSplits
from torchws.train import TrainConfig
from torchws.train.distributed import DistInfo, cleanup_distributed, init_distributed
from torchws.train.engine import Trainer

WORLD = 2


def tiny_splits(n: int = 16, size: int = 16) -> TensorSplits:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = (torch.randint(0, 60, (n, 1, size, size), generator=g) + labels.view(-1, 1, 1, 1) * 60).to(torch.uint8)
    return TensorSplits(images, labels, images[:8].clone(), labels[:8].clone(), 4, list("abcd"), (0.45,), (0.25,),
                        "tiny")  # fmt: skip


def cfg_for(out_dir: Path, model: str, batch: int, steps: int, accum: int = 1) -> TrainConfig:
    return TrainConfig(model=model, dataset="tiny", batch_size=batch, accum_steps=accum, epochs=1, max_steps=steps,
                       lr=0.4, schedule="constant", out_dir=str(out_dir), progress=False, tensorboard=False,
                       plot=False, save_checkpoints=False, deterministic=True, device="cpu").validate()  # fmt: skip


# (name, model, images per process, optimizer steps, micro-batches per step)
SCENARIOS = [
    ("gnws_1step", "cifar_resnet20_gn_ws", 1, 1, 1),
    ("bn_1step", "cifar_resnet20_bn", 1, 1, 1),
    ("gnws_accum", "cifar_resnet20_gn_ws", 1, 3, 2),
]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    info, device = init_distributed("cpu")  # from the environment, as under torchrun
    assert info.enabled and info.rank == rank and info.world_size == WORLD
    splits = tiny_splits()
    try:
        for name, model, batch, steps, accum in SCENARIOS:
            trainer = Trainer(cfg_for(Path(out) / name, model, batch, steps, accum), info, device, splits, echo=False)
            trainer.run()
            torch.save(trainer.model.state_dict(), Path(out) / f"{name}_rank{rank}.pt")
    finally:
        cleanup_distributed(info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def single_process(tmp_path: Path, model: str, batch: int, steps: int, accum: int = 1) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg_for(tmp_path, model, batch, steps, accum), DistInfo(), torch.device("cpu"),
                          tiny_splits(), echo=False)  # fmt: skip
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    return trainer.model.state_dict()


def load(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS])
def test_ranks_hold_identical_parameters(ddp_results, name):
    """Buffers too: BN running stats drift per process in training, and every rank must evaluate (after the last
    step) the same model rank 0 saves, or the all-reduced accuracy mixes several models."""
    a, b = load(ddp_results, name, 0), load(ddp_results, name, 1)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point() and "running" not in k)


def test_gn_ws_has_no_batch_dependence_across_processes(ddp_results, tmp_path):
    """One SGD step: 2 processes x 1 image == 1 process x 2 images (fp32 tolerance)."""
    single = single_process(tmp_path, "cifar_resnet20_gn_ws", batch=2, steps=1)
    ddp = load(ddp_results, "gnws_1step", 0)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bn_depends_on_the_per_process_batch(ddp_results, tmp_path):
    single = single_process(tmp_path, "cifar_resnet20_bn", batch=2, steps=1)
    assert max_param_diff(load(ddp_results, "bn_1step", 0), single) > 1e-4


def test_accumulation_under_ddp_matches_one_process(ddp_results, tmp_path):
    """2 processes x 2 micro-batches of 1 (accumulated, no_sync) == 1 process x 4 images, over 3 steps."""
    single = single_process(tmp_path, "cifar_resnet20_gn_ws", batch=4, steps=3)
    ddp = load(ddp_results, "gnws_accum", 0)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun_cli(tmp_path):
    """The real launcher: torchrun --nproc-per-node 2 -m torchws.train on digits, rank 0 alone writes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "torchws.train", "--dataset", "digits", "--model", "cifar_resnet20_gn_ws",
           "--batch-size", "1", "--max-steps", "4", "--epochs", "1", "--no-progress", "--no-tensorboard",
           "--out-dir", str(out), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "last.pt").is_file() and (out / "summary.json").is_file()
    assert result.stdout.count("training cifar_resnet20_gn_ws") == 1  # only rank 0 prints


# torchrun runs this script on every rank: rank 1 of the first attempt SIGKILLs itself after KILL_AT optimizer steps
KILLED_RANK_SCRIPT = """
import os, signal, sys
import torch
from torchws.cli import main
from torchws.train import engine

torch.set_num_threads(1)
real, calls = engine.train_step, [0]


def step(*args, **kwargs):
    real(*args, **kwargs)
    calls[0] += 1
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and os.environ["RANK"] == "1" and calls[0] == int(os.environ["KILL_AT"]):
        open(os.environ["KILL_MARK"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


engine.train_step = step
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_torchrun_restarts_the_group_after_a_rank_is_killed(tmp_path):
    """torchrun --max-restarts 1, 2 CPU processes (gloo): rank 1 is SIGKILLed mid-epoch 2; torchrun restarts the group,
    which resumes from last.pt (--resume auto) and ends with the weights and optimizer state of an uninterrupted run,
    bit for bit."""
    from torchws.train import load_checkpoint

    script = tmp_path / "child.py"
    script.write_text(KILLED_RANK_SCRIPT)
    args = ["--dataset", "digits", "--model", "cifar_resnet20_gn_ws", "--batch-size", "4", "--max-train-images", "48",
            "--epochs", "2", "--max-eval-images", "16", "--no-progress", "--no-tensorboard", "--no-plot",
            "--device", "cpu", "--deterministic", "--resume", "auto", "--lr", "0.4"]  # 6 steps per epoch  # fmt: skip
    finals = {}
    for name, kill_at in (("straight", 10**6), ("killed", 9)):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
               "--master-port", str(_free_port()), str(script), *args, "--out-dir", str(out)]  # fmt: skip
        mark = str(tmp_path / f"{name}.mark")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": str(kill_at), "KILL_MARK": mark}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        finals[name] = load_checkpoint(out / "last.pt")
    assert finals["killed"]["step"] == finals["straight"]["step"] == 12
    for key, value in finals["straight"]["model"].items():
        assert torch.equal(value, finals["killed"]["model"][key]), key
    for key, state in finals["straight"]["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], finals["killed"]["optimizer"]["state"][key]["momentum_buffer"])
    accuracies = {name: [r["test_acc"] for r in state["history"]] for name, state in finals.items()}
    assert accuracies["straight"] == accuracies["killed"]
    assert (tmp_path / "killed.mark").exists() and not (tmp_path / "straight.mark").exists()  # the kill happened
