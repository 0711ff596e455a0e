"""A sweep's grid: normalization setups x images per step x seeds, one protocol, and the lr search before it.

Protocol (the paper's): every batch size trains for the same number of epochs on the same images; the lr scales
linearly with the batch, ``lr = base_lr * batch / 256``, from one ``base_lr`` per setup. That base lr is chosen by a
search fixed before any run (``search_lrs`` at ``search_batch`` images per step, seed ``search_seed``, the same for
every setup, extended while the best is at an edge: :mod:`torchws.experiments.selection`): the best final test
accuracy wins (ties: the smaller lr).

A setup is a model-name suffix of the registry (``<arch>_<setup>``, e.g. ``cifar_resnet8_gn_ws``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ExperimentError

__all__ = [
    "DEFAULT_SETUPS",
    "GRIDS",
    "SETUP_LABELS",
    "GridSpec",
    "RunSpec",
    "grid_runs",
    "resolve_grid",
    "search_runs",
]

SETUP_LABELS = {  # setup -> what the report calls it
    "bn": "BN",
    "gn": "GN",
    "gn_ws": "GN+WS",
    "bn_ws": "BN+WS",
    "ln_ws": "LN+WS",
    "bcn_est_ws": "BCN+WS (estimated)",
    "bcn_ws": "BCN+WS (batch statistics)",
}
DEFAULT_SETUPS = ("bn", "gn", "gn_ws", "bn_ws", "bcn_est_ws", "ln_ws")
BASE_BATCH = 256  # the batch a base lr refers to


@dataclass(frozen=True)
class GridSpec:
    """What a sweep trains. ``protocol()`` holds the fields that define comparable results (a results file holds
    one protocol); setups, batches and seeds may grow between invocations of the same sweep."""

    name: str
    dataset: str = "fashion_mnist"
    arch: str = "cifar_resnet8"
    setups: tuple[str, ...] = DEFAULT_SETUPS
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    seeds: tuple[int, ...] = (0, 1, 2)
    train_images: int | None = 10_000
    eval_images: int | None = 2_000
    epochs: int = 4
    image_size: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.1
    search_batch: int = 8
    search_lrs: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8, 1.6)
    search_seed: int = 100
    search_extend: int = 3  # extensions of the candidates (x2 above, /2 below) while the best is at an edge
    max_steps: int | None = None  # tests only: cut every run short
    data_dir: str | None = field(default=None, compare=False)

    def protocol(self) -> dict[str, Any]:
        """The fields that make two runs comparable (not the data's location, not which cells are run)."""
        skip = {"name", "setups", "batches", "seeds", "data_dir"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k not in skip}  # fmt: skip

    def fingerprint(self) -> str:
        """12 hex digits identifying the protocol; every record of a results file carries it."""
        text = json.dumps(self.protocol(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def model(self, setup: str) -> str:
        return f"{self.arch}_{setup}"

    def size(self) -> int:
        """Number of grid runs (the lr search not included)."""
        return len(self.setups) * len(self.batches) * len(self.seeds)


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep. kind: "search" (lr search) or "grid"."""

    kind: str
    setup: str
    batch: int
    seed: int
    base_lr: float | None  # None: the setup's searched lr, known once the search is done

    @property
    def run_id(self) -> str:
        if self.kind == "search":
            return f"search_{self.setup}_b{self.batch}_lr{self.base_lr:g}_s{self.seed}"
        return f"{self.setup}_b{self.batch}_s{self.seed}"


GRIDS = {
    # 10,000 images x 4 epochs: sized by the quick grid's measured images/s to about 4-5 h of one process on one
    # core (174 runs with the search), under the 6 h budget with room for a shared machine
    "default": GridSpec("default"),
    # about 10 minutes on 2 shared cores: 2 seeds, 5 batch sizes, 1,024 images x 2 epochs, 2 candidate lrs
    "quick": GridSpec(
        "quick",
        batches=(1, 2, 8, 32, 128),
        seeds=(0, 1),
        train_images=1024,
        eval_images=1000,
        epochs=2,
        search_lrs=(0.2, 0.8),
    ),
}


def _check_values(spec: GridSpec) -> None:
    unknown = [s for s in spec.setups if s not in SETUP_LABELS]
    if unknown:
        raise ExperimentError(f"--setups: unknown setup {unknown[0]!r}; valid setups: {', '.join(SETUP_LABELS)}")
    for name in ("setups", "batches", "seeds", "search_lrs"):
        values = getattr(spec, name)
        if not values or len(set(values)) != len(values):
            raise ExperimentError(f"--{name.replace('_', '-')}: give one or more distinct values, got {list(values)}")
    if min(spec.batches) < 1 or spec.search_batch < 1 or spec.epochs < 1 or min(spec.search_lrs) <= 0:
        raise ExperimentError("--batches, --search-batch and --epochs must be >= 1 and --search-lrs > 0")
    if spec.search_extend < 0:
        raise ExperimentError(f"--search-extend must be >= 0, got {spec.search_extend}")
    if spec.search_seed in spec.seeds:
        raise ExperimentError(f"--search-seed {spec.search_seed} is also one of --seeds; the lr search uses a seed "
                              "of its own so the reported runs are not the ones the lr was picked on")  # fmt: skip


def resolve_grid(name: str, **overrides: Any) -> GridSpec:
    """The named grid with ``overrides`` (None values ignored), checked. Raises ExperimentError on bad values."""
    if name not in GRIDS:
        raise ExperimentError(f"--grid: unknown grid {name!r}; valid grids: {', '.join(GRIDS)}")
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    if values.get("dataset") == "imagefolder" and "train_images" not in values:
        values["train_images"] = None  # every image of the folder (the trainer cannot subset a folder)
    spec = dataclasses.replace(GRIDS[name], **values)
    _check_values(spec)
    return spec


def search_runs(spec: GridSpec) -> list[RunSpec]:
    """The lr search's first round: every setup at ``search_batch`` with every candidate lr, one seed (extensions
    are added by the sweep as the results come in)."""
    return [RunSpec("search", s, spec.search_batch, spec.search_seed, lr) for s in spec.setups for lr in
            spec.search_lrs]  # fmt: skip


def grid_runs(spec: GridSpec) -> list[RunSpec]:
    """The grid, seed by seed (a partial sweep then covers every setup and batch with its first seeds)."""
    return [RunSpec("grid", s, b, seed, None) for seed in spec.seeds for s in spec.setups for b in spec.batches]
