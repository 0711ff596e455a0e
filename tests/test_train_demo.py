"""`torchws demo` with the tiny budget: four variants, a table, results.json and curves.png."""

from __future__ import annotations

import json
import math

import pytest
import torch

from torchws.data import DatasetNotFoundError, find_fashion_mnist
from torchws.demo import BASE_LR, BUDGETS, VARIANTS, Budget, resolve_budget, run_demo
from torchws.train import ConfigError


def fashion_mnist_installed() -> bool:
    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        return False
    return True


@pytest.mark.skipif(not fashion_mnist_installed(), reason="Fashion-MNIST not installed (apt-get install "
                    "dataset-fashion-mnist)")  # fmt: skip
def test_tiny_demo_writes_table_plot_and_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        results = run_demo(str(tmp_path), "tiny", threads=1)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [v["variant"] for v in saved["variants"]] == [v[0] for v in VARIANTS]
    assert saved["eval_images"] == BUDGETS["tiny"].eval_images
    runs = {(r["model"], r["total_batch"]): r for r in
            (json.loads(path.read_text()) for path in tmp_path.glob("*/summary.json"))}  # fmt: skip
    assert len(runs) == len(VARIANTS)
    budget = BUDGETS["tiny"]
    for (label, model, batch), row in zip(VARIANTS, saved["variants"]):
        run = runs[(model, batch)]  # the variant's own run dir
        assert (row["variant"], row["model"], row["images/step"]) == (label, model, batch)
        assert run["steps"] == budget.train_images // batch and run["epochs"] == budget.epochs
        assert run["peak_lr"] == BASE_LR * batch / 256  # linear scaling from 0.4 at 256
        assert row["test acc %"] == run["final_test_acc"] == run["history"][-1]["test_acc"]
        correct = row["test acc %"] * budget.eval_images / 100  # a count of test images
        assert abs(correct - round(correct)) < 1e-9 and 0 <= correct <= budget.eval_images
        assert math.isfinite(row["test loss"]) and row["train img/s"] > 0
        assert f"| {row['variant']}" in out and f"{row['test acc %']:.4g}" in out
    # every variant saw the same number of training images
    seen = {label: curve[-1]["images_seen"] for label, curve in results["curves"].items()}
    assert set(seen.values()) == {BUDGETS["tiny"].train_images}


def test_budget_names_and_counts():
    assert resolve_budget("small") == BUDGETS["small"]
    assert resolve_budget("20000") == Budget(20000, 2, 10000)
    with pytest.raises(ConfigError, match="--budget"):
        resolve_budget("10")
