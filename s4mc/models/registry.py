"""Explicit name -> builder registry and ``build_model(net_cfg)``.

Release configs name classes by dotted path (``u2pl.models.resnet.resnet101``); such strings are
matched on their last component against this table and never imported, so a config cannot make
the program import arbitrary code.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from typing import Any, Callable, Mapping

from torch import nn

from s4mc.config import SCHEMA
from s4mc.errors import ConfigError

from .deeplabv3plus import AuxHead, DeepLabV3PlusDecoder, SegmentationModel
from .dpt import DPTHead, ViTSegmentationModel
from .deeplabv3plus_unimatch import UniMatchDeepLabV3PlusDecoder
from .resnet import ResNet, resnet50, resnet101, resnet_tiny
from .vit import DINOV2_WEIGHTS_HINT, SIZES, DinoVisionTransformer, dinov2_base, dinov2_large, dinov2_small, vit_tiny
from .weights import TOY_ENCODER_NAME, check_backbone_file, load_backbone, toy_encoder_file
from .xception import PRETRAINED_HINT as XCEPTION_WEIGHTS_HINT, xception65

log = logging.getLogger("s4mc")

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet_tiny": resnet_tiny,
    "dinov2_small": dinov2_small,
    "dinov2_base": dinov2_base,
    "dinov2_large": dinov2_large,
    "vit_tiny": vit_tiny,
    "xception65": xception65,
}
DECODERS: dict[str, Callable[..., nn.Module]] = {"deeplabv3_plus": DeepLabV3PlusDecoder, "dpt": DPTHead,
                                                 "deeplabv3_plus_unimatch": UniMatchDeepLabV3PlusDecoder}
VIT_ENCODERS = ("dinov2_small", "dinov2_base", "dinov2_large", "vit_tiny")
# Release class names that differ from ours (after taking the last dotted component).
_ALIASES = {"dec_deeplabv3_plus": "deeplabv3_plus"}


def resolve(type_name: Any, table: Mapping[str, Callable[..., nn.Module]], key: str) -> tuple[str, Callable[..., nn.Module]]:
    """Return ``(canonical_name, builder)`` for ``type_name``; ConfigError naming ``key`` otherwise."""
    if not isinstance(type_name, str) or not type_name.strip():
        raise ConfigError(f"{key}: expected a type name string, got {type_name!r}; valid: {', '.join(sorted(table))}")
    name = type_name.strip().rsplit(".", 1)[-1]
    name = _ALIASES.get(name, name)
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"{key}: unknown type {type_name!r}{hint}; valid: {', '.join(sorted(table))} "
            f"(a dotted release path such as u2pl.models.resnet.resnet101 is matched on its last name)"
        )
    return name, table[name]


def _call(builder: Callable[..., nn.Module], kwargs: Mapping[str, Any], key: str, **fixed: Any) -> nn.Module:
    # Turn an unknown kwarg into a ConfigError that names the config key, not a TypeError from torch.
    params = inspect.signature(builder).parameters
    takes_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_var:  # resnet50/101 forward **kwargs to ResNet: check against its signature
        params = {**params, **inspect.signature(ResNet.__init__).parameters}
    allowed = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD and n not in ("self", "layers")}
    if builder is resnet_tiny:
        allowed.add("layers")
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise ConfigError(f"{key}: unknown argument(s) {bad}; accepted: {sorted(allowed - set(fixed))}")
    try:
        return builder(**{**dict(kwargs), **fixed})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from e


def build_model(net_cfg: Mapping[str, Any]) -> SegmentationModel:
    """Build encoder + DeepLabv3+ decoder (+ aux head) from the ``cfg["net"]`` dict.

    Keys used: ``num_classes`` (required), ``encoder.{type, stem, pretrained, kwargs}``,
    ``decoder.{type, kwargs}``, ``aux_loss`` (``None``/absent = no aux head). Missing optional keys
    take the release defaults. If ``encoder.pretrained`` is set, the backbone is loaded strictly.
    """
    if "num_classes" not in net_cfg:
        raise ConfigError("net.num_classes: required (number of classes, e.g. 21 for VOC, 19 for Cityscapes)")
    num_classes = net_cfg["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"net.num_classes: expected a positive integer, got {num_classes!r}")

    enc_cfg = net_cfg.get("encoder") or {}
    enc_name, enc_builder = resolve(enc_cfg.get("type", "resnet101"), ENCODERS, "net.encoder.type")
    dec_cfg = net_cfg.get("decoder") or {}
    dec_name, _ = resolve(dec_cfg.get("type", "deeplabv3_plus"), DECODERS, "net.decoder.type")
    if enc_name in VIT_ENCODERS or dec_name == "dpt":
        return build_vit_model(net_cfg, enc_name, dec_name, num_classes)
    stem = enc_cfg.get("stem") or "deep"
    if stem not in ("deep", "torchvision"):
        raise ConfigError(f"net.encoder.stem: expected 'deep' or 'torchvision', got {stem!r}")
    enc_kwargs = dict(enc_cfg.get("kwargs") or {})
    # stem has its own key; sync_bn is applied later by maybe_sync_bn (release code injected it here).
    for k in ("stem", "sync_bn"):
        enc_kwargs.pop(k, None)
    encoder = _call(enc_builder, enc_kwargs, "net.encoder.kwargs", stem=stem)

    dec_builder = DECODERS[dec_name]
    dec_kwargs = dict(dec_cfg.get("kwargs") or {})
    # Release decoder kwargs that this implementation derives itself or does not need.
    for k in ("in_planes", "num_classes", "sync_bn", "low_planes"):
        dec_kwargs.pop(k, None)
    # Channel counts come from the encoder, so narrow encoders (resnet_tiny) just work.
    decoder = _call(
        dec_builder,
        dec_kwargs,
        "net.decoder.kwargs",
        in_planes=encoder.out_channels[-1],
        low_planes=encoder.out_channels[0],
        num_classes=num_classes,
    )

    auxor = None
    aux_cfg = net_cfg.get("aux_loss")
    if aux_cfg:
        if len(encoder.out_channels) < 3:
            raise ConfigError(f"net.aux_loss: the {enc_name} encoder has no layer3 output for an aux head; "
                              "set net.aux_loss: null")
        aux_in = encoder.out_channels[2]
        declared = aux_cfg.get("aux_plane") if isinstance(aux_cfg, Mapping) else None
        if declared is not None and declared != aux_in:
            # The head must match layer3's real width; a stale 1024 on a narrow encoder is harmless.
            log.info("net.aux_loss.aux_plane=%s ignored: %s's layer3 has %d channels", declared, enc_name, aux_in)
        auxor = AuxHead(aux_in, num_classes)

    model = SegmentationModel(encoder, decoder, auxor)
    pretrained = enc_cfg.get("pretrained")
    if pretrained:
        load_backbone(model, toy_encoder_file() if pretrained == TOY_ENCODER_NAME else pretrained)
    return model


def check_pretrained_file(net_cfg: Mapping[str, Any]) -> None:
    """One error naming a missing `net.encoder.pretrained` file and where to get it, before any
    data or model is built (train_semi.py calls it first)."""
    name, _ = resolve((net_cfg.get("encoder") or {}).get("type", "resnet101"), ENCODERS, "net.encoder.type")
    hints = {"xception65": XCEPTION_WEIGHTS_HINT, **{vit: DINOV2_WEIGHTS_HINT for vit in VIT_ENCODERS}}
    check_backbone_file(net_cfg, hints.get(name))


def _non_default(block: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> list[str]:
    """Keys of `block` set to something other than the config schema's default."""
    return sorted(k for k, v in (block or {}).items() if k not in defaults or v != defaults[k].default)


def build_vit_model(net_cfg: Mapping[str, Any], enc_name: str, dec_name: str, num_classes: int) -> SegmentationModel:
    """A DINOv2 encoder with UniMatch V2's DPT head (docs/method.md, "UniMatch V2"); the head's
    widths are the ones UniMatch V2 pairs with each encoder size."""
    if enc_name not in VIT_ENCODERS or dec_name != "dpt":
        raise ConfigError(f"net.encoder.type {enc_name} and net.decoder.type {dec_name} do not fit together: the DPT "
                          f"head reads ViT layers ({', '.join(VIT_ENCODERS)}), and a ViT encoder needs "
                          f"net.decoder.type: dpt")
    enc_cfg, dec_cfg = net_cfg.get("encoder") or {}, net_cfg.get("decoder") or {}
    # Every loaded config carries the schema's ResNet/DeepLab kwargs; changed ones are named once, as
    # ignored, so that a ResNet config switched to a ViT with --opts still runs.
    for key, block, defaults in (("net.encoder.kwargs", enc_cfg.get("kwargs"), SCHEMA["net"]["encoder"]["kwargs"]),
                                 ("net.decoder.kwargs", dec_cfg.get("kwargs"), SCHEMA["net"]["decoder"]["kwargs"])):
        changed = _non_default(block, defaults)
        if changed:
            log.warning("%s: %s ignored: they shape the ResNet/DeepLabv3+ model; %s + dpt takes its widths from "
                        "the encoder size", key, ", ".join(changed), enc_name)
    if net_cfg.get("aux_loss"):
        raise ConfigError("net.aux_loss: the DPT model has no auxiliary head; set net.aux_loss: null")
    encoder: DinoVisionTransformer = ENCODERS[enc_name]()
    spec = SIZES[encoder.size_name]
    decoder = DPTHead(encoder.embed_dim, num_classes, features=spec.dpt_features, out_channels=spec.dpt_out_channels)
    model = ViTSegmentationModel(encoder, decoder, None)
    pretrained = enc_cfg.get("pretrained")
    if pretrained:
        if pretrained == TOY_ENCODER_NAME:
            raise ConfigError(f"net.encoder.pretrained: toy is the toy's ResNet encoder; {enc_name} has no toy "
                              f"weights (set net.encoder.pretrained: null)")
        load_backbone(model, pretrained)
    return model
