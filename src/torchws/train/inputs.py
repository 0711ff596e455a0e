"""Build what a run trains on: the dataset (in memory or an image folder), its loaders sharded by rank, and the
model, with the checks that turn bad names and mismatched sizes into one-line ConfigErrors.

Image-size rule: ImageNet-family models (registry input size 224) need images of at least 112 px (half the nominal
size: the stride-32 network then still ends on a 4x4 map), so the 8-32 px in-memory datasets are refused for them
with a pointer to the small-image ``cifar_*`` models; small-image models need at least 8 px. Channels always fit:
the model is built with ``in_chans`` = the dataset's channels.
"""

from __future__ import annotations

import difflib
import itertools
import multiprocessing
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, Subset

from torchws import data as tdata
from torchws import models as tmodels

from .config import TrainConfig
from .distributed import DistInfo
from .errors import ConfigError
from .signals import ignore_stop_signals

__all__ = ["Inputs", "build_inputs", "build_model", "check_image_size", "min_image_size"]

EVAL_BATCH = 256
SUBSET_SEED = 0  # the --max-train-images subset is the same for every run and seed
WORKER_SHUTDOWN_S = 3.0  # how long a run's end waits for DataLoader workers before killing them


@dataclass
class Inputs:
    """Loaders and shape facts of a run. ``train`` has ``set_epoch`` and ``len`` (micro-batches per epoch)."""

    train: object
    test: Iterable[tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    channels: int
    image_size: int
    train_images: int  # images in the (sub)set, all ranks together
    test_images: int


class _SkipFirst(Sampler):
    """``sampler``'s indices without the first ``skip`` of the next iteration only (a resumed epoch's done batches:
    the loader need not decode images only to throw them away; every item's crop is a function of its own index)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.skip = sampler, 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class _FolderTrainLoader:
    """DataLoader over an ImageFolderDataset with the TensorLoader interface (set_epoch, len, iter)."""

    def __init__(self, dataset: tdata.ImageFolderDataset, cfg: TrainConfig, info: DistInfo) -> None:
        self.dataset = dataset  # seeded: each item's crop is a function of (seed, epoch, index)
        if info.enabled:
            self.sampler = DistributedSampler(dataset, info.world_size, info.rank, shuffle=True, seed=cfg.seed,
                                              drop_last=True)  # fmt: skip
        else:
            self.sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed))
        # a generator of its own: starting an iteration draws the workers' base seed from it, not from the global RNG
        # (the one the model's randomness uses and checkpoints restore), which a resumed run would then see shifted.
        # The workers ignore SIGTERM / SIGINT sent to the whole process group: the trainer stops them at a step boundary
        self._skipping = _SkipFirst(self.sampler)
        self.batch_size = cfg.batch_size
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=self._skipping, num_workers=cfg.workers,
                                 drop_last=True, pin_memory=torch.cuda.is_available(),
                                 generator=torch.Generator().manual_seed(cfg.seed),
                                 worker_init_fn=ignore_stop_signals)  # fmt: skip
        self.seed = cfg.seed
        self._workers: list[multiprocessing.process.BaseProcess] = []

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        else:
            self.sampler.generator = torch.Generator().manual_seed(self.seed + epoch)

    def skip_batches(self, count: int) -> None:
        """The next iteration starts ``count`` batches in (a resumed epoch); later ones start at the beginning."""
        self._skipping.skip = count * self.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        before = set(multiprocessing.active_children())
        iterator = iter(self.loader)
        self._workers = [p for p in multiprocessing.active_children() if p not in before]  # this iteration's workers
        return iterator

    def shutdown_workers(self, timeout: float = WORKER_SHUTDOWN_S) -> None:
        """End the last iteration's worker processes within about ``timeout`` seconds (call it once the iterator is
        gone). The workers ignore SIGTERM (``ignore_stop_signals``), which is what PyTorch's own shutdown and
        multiprocessing's exit handler send: a worker stuck in a read (a hung file system) outlived the iterator, and
        the exit handler then waited for it without a timeout, so the trainer never exited. Stragglers get SIGKILL."""
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(1.0)
        self._workers = []


def min_image_size(model_name: str) -> int:
    """Smallest image side the model accepts under the rule in the module docstring."""
    side = tmodels.get_model_info(model_name).input_size[-1]
    return side // 2 if side >= 224 else 8


def check_image_size(model_name: str, image_size: int, dataset: str) -> None:
    """Raise ConfigError when ``dataset``'s images (``image_size`` px) are too small for ``model_name``."""
    need = min_image_size(model_name)
    if image_size < need:
        hint = " (use a small-image model such as cifar_resnet20_gn_ws or cifar_resnet18_gn_ws)" if need > 32 else ""
        raise ConfigError(f"--model {model_name} needs images of at least {need} px, but --dataset {dataset} has "
                          f"{image_size} px images{hint}")  # fmt: skip


def check_model_name(name: str) -> None:
    """Raise ConfigError for an unregistered model, with close matches and every valid name."""
    valid = tmodels.list_models()
    if name in valid:
        return
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"--model: unknown model {name!r}; {hint}valid names: {', '.join(valid)}")


def build_model(cfg: TrainConfig, num_classes: int, channels: int) -> nn.Module:
    """``create_model`` with the dataset's classes and channels; unknown names become ConfigError."""
    check_model_name(cfg.model)
    # the WS pass is enabled by the trainer once the model sits on its device (engines are chosen per device)
    return tmodels.create_model(cfg.model, num_classes=num_classes, in_chans=channels, batched_ws=False)


def _subset_train(splits: tdata.TensorSplits, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = splits.train_images, splits.train_labels
    if limit is None or limit >= images.shape[0]:
        return images, labels
    keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SUBSET_SEED))[:limit]
    return images[keep], labels[keep]


def _tensor_inputs(cfg: TrainConfig, splits: tdata.TensorSplits, info: DistInfo, device: torch.device) -> Inputs:
    channels, size = splits.image_shape[0], splits.image_shape[-1]
    check_image_size(cfg.model, size, splits.name)
    augment = cfg.augment
    if augment == "auto":
        augment = "crop_flip" if splits.name.startswith("cifar") else "none"
    images, labels = _subset_train(splits, cfg.max_train_images)
    if images.shape[0] < info.world_size * cfg.batch_size * cfg.accum_steps:
        raise ConfigError(
            f"--dataset {splits.name}: {images.shape[0]} training images are fewer than one optimizer "
            f"step needs ({info.world_size} ranks x {cfg.batch_size} x {cfg.accum_steps} micro-batches)"
        )
    common = dict(mean=splits.mean, std=splits.std, device=device)
    train = tdata.TensorLoader(images, labels, cfg.batch_size, shuffle=True, augment=None if augment == "none" else
                               augment, drop_last=True, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                               **common)  # fmt: skip
    n_test = (
        splits.test_images.shape[0]
        if cfg.max_eval_images is None
        else min(cfg.max_eval_images, splits.test_images.shape[0])
    )
    if n_test < info.world_size:  # a rank would get an empty test shard
        raise ConfigError(f"--max-eval-images / --dataset {splits.name}: {n_test} test images cannot be shared by "
                          f"{info.world_size} ranks; evaluate on at least {info.world_size}")  # fmt: skip
    # each rank evaluates every world_size-th image, without padding, so the all-reduced counts are exact
    shard = slice(info.rank, n_test, info.world_size)
    test = tdata.TensorLoader(splits.test_images[:n_test][shard], splits.test_labels[:n_test][shard], EVAL_BATCH,
                              shuffle=False, **common)  # fmt: skip
    return Inputs(train, test, splits.num_classes, channels, size, images.shape[0], n_test)


def _folder_inputs(cfg: TrainConfig, info: DistInfo) -> Inputs:
    if cfg.data_dir is None:
        raise ConfigError("--dataset imagefolder needs --data-dir (the folder holding train/<class>/ and val/<class>/)")
    size = cfg.image_size or tmodels.get_model_info(cfg.model).input_size[-1]
    check_image_size(cfg.model, size, "imagefolder")
    train_set = tdata.ImageFolderDataset(cfg.data_dir, "train", image_size=size, seed=cfg.seed)
    test_set = tdata.ImageFolderDataset(cfg.data_dir, "val", image_size=size)
    if train_set.classes != test_set.classes:
        raise tdata.DatasetFormatError(f"{cfg.data_dir}: train/ and val/ hold different class folders")
    n_test = len(test_set) if cfg.max_eval_images is None else min(cfg.max_eval_images, len(test_set))
    shard = Subset(test_set, range(info.rank, n_test, info.world_size))
    test = DataLoader(shard, batch_size=max(cfg.batch_size, 32), num_workers=cfg.workers,
                      worker_init_fn=ignore_stop_signals)  # fmt: skip
    return Inputs(_FolderTrainLoader(train_set, cfg, info), test, train_set.num_classes, 3, size, len(train_set),
                  n_test)  # fmt: skip


def build_inputs(
    cfg: TrainConfig, info: DistInfo, device: torch.device, splits: tdata.TensorSplits | None = None
) -> Inputs:
    """Loaders for ``cfg.dataset`` (or for ``splits`` when given: in-memory data from the caller).

    Raises:
        ConfigError: unknown dataset or model name, images too small for the model, too few images.
        DatasetNotFoundError / DatasetFormatError: from torchws.data.
    """
    check_model_name(cfg.model)
    if splits is None:
        if cfg.dataset.lower().replace("-", "_") not in tdata.list_datasets():
            raise ConfigError(f"--dataset: unknown dataset {cfg.dataset!r}; valid names: "
                              f"{', '.join(tdata.list_datasets())}")  # fmt: skip
        if cfg.dataset.lower() == "imagefolder":
            return _folder_inputs(cfg, info)
        splits = tdata.load_dataset(cfg.dataset, cfg.data_dir)
    return _tensor_inputs(cfg, splits, info, device)
