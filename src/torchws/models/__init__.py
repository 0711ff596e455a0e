"""Model zoo: ResNet / ResNeXt (ImageNet) and small-image ResNets with BN, GN, GN+WS and BCN+WS variants.

`create_model("resnet50_gn_ws")`, `list_models("*_gn_ws")`; the authors' checkpoints load with
`load_official_checkpoint(model, "R-50-GN-WS.pth.tar")` (WS repo, into `*_gn_ws` with ws_preset="official") or
`load_official_checkpoint(model, "rn50_bcn_ws.pth")` (BCN repo, into `*_bcn_ws` with ws_preset="bcn").
"""

from torchws.models import cifar_resnet as _cifar_resnet  # noqa: F401  (registers the small-image models)
from torchws.models._common import FeatureInfo
from torchws.models.cifar_resnet import CifarResNet
from torchws.models.official import (
    CheckpointFormatError,
    CheckpointMismatchError,
    LoadResult,
    load_official_checkpoint,
    official_checkpoint_name,
    read_official_state_dict,
)
from torchws.models.registry import (
    ModelInfo,
    create_model,
    get_model_info,
    list_models,
    register_model,
    unregister_model,
)
from torchws.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "CifarResNet",
    "FeatureInfo",
    "LoadResult",
    "ModelInfo",
    "ResNet",
    "create_model",
    "get_model_info",
    "list_models",
    "load_official_checkpoint",
    "official_checkpoint_name",
    "read_official_state_dict",
    "register_model",
    "unregister_model",
]
