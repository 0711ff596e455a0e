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
