"""How far torchws' presets are from each peer's own code, by dtype and by kind of filter.

Each peer's weight transform is written here as the peer writes it, computing in the weight's dtype (mmcv
``conv_ws_2d``, timm ``StdConv2d``, the BCN repo's ImageNet conv). For every case the script prints the largest
absolute difference between torchws and the peer, and between each of them and float64 (the same formula on the
same weights, upcast). The figures go to docs/numerics.md.

    python scripts/peer_numerics.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchws.functional import weight_standardize


def mmcv_conv_ws(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """mmcv ``conv_ws_2d`` (the authors' formula, ``official``): unbiased std, eps added to the std."""
    flat = w.view(w.size(0), -1)
    mean = flat.mean(dim=1, keepdim=True).view(-1, *[1] * (w.dim() - 1))
    std = flat.std(dim=1, keepdim=True).view(-1, *[1] * (w.dim() - 1))
    return (w - mean) / (std + eps)


def timm_std_conv(w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """timm ``StdConv2d``: one ``F.batch_norm`` over ``(1, O, n)``, population variance, eps inside the root."""
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=eps).reshape_as(w)


def bcn_repo_conv(w: torch.Tensor) -> torch.Tensor:
    """The BCN repo's ImageNet conv: unbiased variance, 1e-5 inside the root."""
    mean = w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
    centered = w - mean
    return centered / torch.pow(centered.view(w.size(0), -1).var(dim=1) + 1e-5, 0.5).view(-1, 1, 1, 1)


PEERS = {"official": mmcv_conv_ws, "timm": timm_std_conv, "bcn": bcn_repo_conv}


def weights(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "ordinary":  # Kaiming-scale 3x3 filters with a small offset
        w = torch.randn(256, 64, 3, 3, generator=g) * 0.06 + 0.01
    elif kind == "constant":  # every filter constant, values that are not exact in binary
        w = (torch.rand(256, 1, 1, 1, generator=g) * 4 - 2).expand(256, 64, 3, 3).contiguous()
    elif kind == "fan-in 2":
        w = torch.randn(4096, 2, 1, 1, generator=g)
    else:
        raise ValueError(kind)
    return w.to(dtype)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def main() -> None:
    print(f"torch {torch.__version__}")
    header = ("preset", "dtype", "filters", "|torchws - peer|", "|torchws - f64|", "|peer - f64|")
    print("{:9} {:9} {:9} {:>17} {:>16} {:>13}".format(*header))
    cases = [(torch.float32, kind) for kind in ("ordinary", "constant", "fan-in 2")]
    cases += [(dt, "ordinary") for dt in (torch.bfloat16, torch.float16)]
    for preset, peer in PEERS.items():
        for dtype, kind in cases:
            w = weights(kind, dtype)
            ours, theirs = weight_standardize(w, preset=preset), peer(w)
            exact = peer(w.double())  # the same formula on the same (rounded) weights, in float64
            print(
                f"{preset:9} {str(dtype)[6:]:9} {kind:9} {max_abs(ours, theirs):17.2e} {max_abs(ours, exact):16.2e} "
                f"{max_abs(theirs, exact):13.2e}"
            )


if __name__ == "__main__":
    main()
