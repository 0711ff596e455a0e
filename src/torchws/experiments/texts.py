"""The report's prose that depends on the protocol: the protocol itself and what in this setting may explain a
verdict. Every number comes from the protocol or the results."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .grid import SETUP_LABELS

__all__ = ["caveats", "parameter_count", "protocol_text"]

PAPER_SETTING = ("ImageNet (1.28M images of 224 px, 1,000 classes), ResNet-50 (25.6M parameters), 90 epochs, "
                 "top-1 error")  # fmt: skip


def parameter_count(model_name: str, classes: int, channels: int) -> int:
    """Parameters of a registered model (built on the meta device: no memory, no init cost)."""
    from torchws.models import create_model

    with torch.device("meta"):
        model = create_model(model_name, num_classes=classes, in_chans=channels, batched_ws=False)
    return sum(p.numel() for p in model.parameters())


def _steps(protocol: Mapping[str, Any], batch: int) -> int | None:
    images = protocol["train_images"]
    return None if images is None else images // batch * protocol["epochs"]


def protocol_text(protocol: Mapping[str, Any], plan: Mapping[str, list], base_batch: int) -> str:
    """The protocol as a Markdown list."""
    p = protocol
    images = "every image of train/" if p["train_images"] is None else f"a fixed subset of {p['train_images']:,}"
    evals = "all test images" if p["eval_images"] is None else f"the first {p['eval_images']:,} test images"
    setups = ", ".join(f"{SETUP_LABELS.get(s, s)} (`{p['arch']}_{s}`)" for s in plan["setups"])
    lines = [
        f"- Data: `{p['dataset']}`, {images} training images (the same subset for every run), no augmentation "
        f"unless the dataset's default adds it; evaluation on {evals} after every epoch.",
        f"- Model: `{p['arch']}` with each setup's norm layers: {setups}. WS preset `paper` (population variance, "
        "eps 1e-5 inside the root); the classifier is a plain Linear. LN+WS is GroupNorm with one group. BCN+WS "
        "(estimated) is `BatchChannelNorm2d(estimate=True)`: the batch part always normalizes with running "
        "statistics updated at rate 0.01, the mode the BCN paper uses for 1-2 images per GPU.",
        f"- Images per step: {', '.join(map(str, plan['batches']))} (one micro-batch per step: BN sees only those "
        f"images; at 1 image per step BN normalizes over one image's pixels, and is run and reported). Seeds: "
        f"{', '.join(map(str, plan['seeds']))} (a seed fixes the initial weights and the data order).",
        f"- Length: {p['epochs']} epoch(s) at every batch size, so every run sees the same images equally often "
        f"(the paper's protocol); larger batches take fewer steps"
        + (f" ({_steps(p, max(plan['batches'])):,} at {max(plan['batches'])} vs {_steps(p, min(plan['batches'])):,} "
           f"at {min(plan['batches'])})" if p["train_images"] else "") + ".",
        f"- Optimizer: SGD, momentum {p['momentum']:g}, weight decay {p['weight_decay']:g} (not on norm parameters "
        f"and biases), {p['schedule']} schedule after a linear warm-up of {p['warmup_epochs']:g} epoch.",
        f"- Learning rate: `lr = base_lr * images_per_step / {base_batch}`, one `base_lr` per setup from a search "
        f"fixed in advance: candidates {', '.join(f'{lr:g}' for lr in p['search_lrs'])} at {p['search_batch']} "
        f"images per step, seed {p['search_seed']} (not a reported seed), the same for every setup; while the best "
        f"is the largest (smallest) lr tried, twice (half) that lr is tried too, up to {p.get('search_extend', 0)} "
        "times each way; the best final test accuracy wins (ties: the smaller lr).",
        "- Reported: final test accuracy (after the last epoch), mean ± sample std over seeds."
        + (f" Every run stopped after at most {p['max_steps']} steps (smoke test)." if p.get("max_steps") else ""),
    ]  # fmt: skip
    return "\n".join(lines)


def caveats(protocol: Mapping[str, Any], parameters: int | None) -> str:
    """What in this setting differs from the paper's and may explain a verdict that does not reproduce."""
    p = protocol
    size = "" if parameters is None else f" ({parameters:,} parameters with GN+WS)"
    data = "an image folder" if p["train_images"] is None else f"{p['train_images']:,} `{p['dataset']}` images"
    lines = [
        f"- Scale: {data}, {p['epochs']} epoch(s), `{p['arch']}`{size}. The paper: {PAPER_SETTING}. "
        "Effects that need long training or large models (WS's benefit grows with depth in the paper) may not show.",
        "- Equal epochs give large batches few steps: in a short budget this handicaps large batches, i.e. BN at "
        "32-128, which favours claim (i) and works against BN's large-batch reference.",
        f"- One base lr per setup, searched at {p['search_batch']} images per step and scaled linearly: a setup "
        "whose best lr does not scale linearly (at the smallest or largest batches) is handicapped there.",
        "- The lr search picks on the same test images the results are reported on (with a seed of its own): a "
        "small optimistic bias shared by every setup.",
        "- Seeds: significance rests on few paired seeds; `inconclusive` means the sweep cannot tell, not that the "
        "setups are equal.",
    ]  # fmt: skip
    return "\n".join(lines)
