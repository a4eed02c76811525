"""DeepLabv3+ on dilated ResNets (U2PL's checkpoint layout) or Xception-65 (UniMatch's), as encoder / decoder / auxor."""

from .deeplabv3plus import ASPP, AuxHead, DeepLabV3PlusDecoder, SegmentationModel
from .registry import DECODERS, ENCODERS, build_model, resolve
from .resnet import Bottleneck, ResNet, resnet50, resnet101, resnet_tiny
from .weights import check_state_dict, load_backbone, load_checkpoint, maybe_sync_bn, torchvision_to_encoder
from .xception import Xception65, xception65

__all__ = [
    "ASPP",
    "AuxHead",
    "Bottleneck",
    "DECODERS",
    "DeepLabV3PlusDecoder",
    "ENCODERS",
    "ResNet",
    "SegmentationModel",
    "Xception65",
    "build_model",
    "check_state_dict",
    "load_backbone",
    "load_checkpoint",
    "maybe_sync_bn",
    "resnet101",
    "resnet50",
    "resnet_tiny",
    "resolve",
    "torchvision_to_encoder",
    "xception65",
]
