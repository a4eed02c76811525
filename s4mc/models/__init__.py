"""The segmentation models, as encoder / decoder / auxor: DeepLabv3+ on dilated ResNets (U2PL's checkpoint
layout) or Xception-65 (UniMatch's), UniMatch's DeepLabv3+, and DINOv2 + DPT (UniMatch V2)."""

from .deeplabv3plus import ASPP, AuxHead, DeepLabV3PlusDecoder, SegmentationModel
from .deeplabv3plus_unimatch import UniMatchDeepLabV3PlusDecoder
from .dpt import DPTHead, ViTSegmentationModel, draw_comp_drop_mask
from .registry import DECODERS, ENCODERS, build_model, check_pretrained_file, resolve
from .vit import DinoVisionTransformer
from .resnet import Bottleneck, ResNet, resnet50, resnet101, resnet_tiny
from .weights import (check_state_dict, from_unimatch_layout, load_backbone, load_checkpoint, maybe_sync_bn,
                      to_unimatch_layout, torchvision_to_encoder)
from .xception import Xception65, xception65

__all__ = [
    "ASPP",
    "AuxHead",
    "Bottleneck",
    "DECODERS",
    "DPTHead",
    "DinoVisionTransformer",
    "DeepLabV3PlusDecoder",
    "ENCODERS",
    "ResNet",
    "SegmentationModel",
    "UniMatchDeepLabV3PlusDecoder",
    "Xception65",
    "build_model",
    "check_pretrained_file",
    "check_state_dict",
    "draw_comp_drop_mask",
    "from_unimatch_layout",
    "load_backbone",
    "load_checkpoint",
    "maybe_sync_bn",
    "resnet101",
    "resnet50",
    "resnet_tiny",
    "resolve",
    "to_unimatch_layout",
    "torchvision_to_encoder",
    "ViTSegmentationModel",
    "xception65",
]
