"""Checks a grid before its first run: every setup names a registered model, the dataset exists, and every model
takes the dataset's images (channels, size). A mistake is one ExperimentError, raised before anything is written."""

from __future__ import annotations

import torch

from torchws import data as tdata
from torchws import models as tmodels
from torchws.train.inputs import check_image_size

from .errors import ExperimentError
from .grid import GridSpec

__all__ = ["check_grid_fits", "dataset_shape"]


def dataset_shape(spec: GridSpec) -> tuple[int, int, int, int | None]:
    """(channels, image side, classes, training images or None for a folder) of the grid's dataset, read from
    disk (so a missing dataset fails here, with the data package's message)."""
    name = spec.dataset.lower().replace("-", "_")
    if name not in tdata.list_datasets():
        raise ExperimentError(f"--dataset: unknown dataset {spec.dataset!r}; valid names: "
                              f"{', '.join(tdata.list_datasets())}")  # fmt: skip
    if name == "imagefolder":
        if spec.data_dir is None:
            raise ExperimentError("--dataset imagefolder needs --data-dir (the folder holding train/<class>/ and "
                                  "val/<class>/)")  # fmt: skip
        if spec.train_images is not None:
            raise ExperimentError("--train-images: an image-folder run trains on every image under train/; leave "
                                  "--train-images unset for --dataset imagefolder")  # fmt: skip
        size = spec.image_size or tmodels.get_model_info(spec.model(spec.setups[0])).input_size[-1]
        info = tdata.dataset_info(name, spec.data_dir, image_size=size)
        return info[0], info[1], info[2], None
    splits = tdata.load_dataset(name, spec.data_dir)
    channels, side = splits.image_shape[0], splits.image_shape[-1]
    return channels, side, splits.num_classes, int(splits.train_images.shape[0])


def _check_model(model_name: str, channels: int, side: int, classes: int, dataset: str) -> int:
    if model_name not in tmodels.list_models():
        raise ExperimentError(f"--arch/--setups: no registered model {model_name!r} (`torchws models` lists them)")
    check_image_size(model_name, side, dataset)
    model = tmodels.create_model(model_name, num_classes=classes, in_chans=channels, batched_ws=False).eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, channels, side, side))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ExperimentError(f"--arch {model_name} does not run on --dataset {dataset} images ({channels} x {side} x "
                              f"{side}): {first}") from None  # fmt: skip
    if tuple(logits.shape) != (1, classes):
        raise ExperimentError(f"--arch {model_name} gives outputs of shape {tuple(logits.shape)} on --dataset "
                              f"{dataset}, expected (1, {classes})")  # fmt: skip
    return sum(p.numel() for p in model.parameters())


def check_grid_fits(spec: GridSpec) -> dict[str, int]:
    """Raise ExperimentError (or the data package's / trainer's one-line errors) when the grid cannot run; returns
    {setup: parameter count of its model on this dataset}."""
    channels, side, classes, train_images = dataset_shape(spec)
    counts = {s: _check_model(spec.model(s), channels, side, classes, spec.dataset) for s in spec.setups}
    available = train_images if spec.train_images is None else min(spec.train_images, train_images or 0)
    largest = max(*spec.batches, spec.search_batch)
    if available is not None and available < largest:
        raise ExperimentError(f"--batches: {largest} images per step need at least that many training images; "
                              f"--dataset {spec.dataset} gives {available}")  # fmt: skip
    return counts
