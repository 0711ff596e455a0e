"""torchrun / torch.distributed setup, detected from environment variables as in torchvision's references.

``torchrun --nproc-per-node N`` sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); without them the run
is a single process. Backend: nccl when training on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "pick_device",
]


@dataclass(frozen=True)
class DistInfo:
    """rank / world_size / local_rank of this process; ``enabled`` when a process group is in use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    owns_group: bool = False  # we created the group, so we destroy it

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``auto``: the local rank's GPU when CUDA is available, else CPU; ``cuda`` without CUDA raises ValueError."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (RANK and WORLD_SIZE set); returns (info, device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(), pick_device(device_preference, 0)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_preference, local_rank)
    if world_size == 1:
        return DistInfo(rank, 1, local_rank), device
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # each attempt of a group that torchrun restarts (--max-restarts) gets keys of its own in the store: gloo
        # otherwise read the killed attempt's addresses and failed to connect ("connectFullMesh ... refused")
        store, _, _ = next(dist.rendezvous("env://", rank, world_size))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"torchws_attempt_{attempt}/", store), rank=rank,
                                world_size=world_size)  # fmt: skip
    return DistInfo(rank, world_size, local_rank, enabled=True, owns_group=owns), device


def cleanup_distributed(info: DistInfo, *, synchronize: bool = True) -> None:
    """Destroy the process group if ``init_distributed`` created it.

    synchronize: wait for every rank first (the normal end of a run). A rank that tore its gloo group down while
    another still had communication in flight aborted ("terminate called without an active exception", about 1 run
    in 5 of the 2-process CPU test). Pass False after an error: the other ranks may never reach the barrier.
    """
    if info.enabled and info.owns_group and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (identity when not distributed)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest of the ranks' ``value`` (identity when not distributed)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing when not distributed)."""
    if info.enabled:
        dist.barrier()
