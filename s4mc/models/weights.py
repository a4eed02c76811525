"""Loading ImageNet backbones and project/U2PL/S4MC checkpoints strictly, and SyncBatchNorm.

Every load is strict: a missing, unexpected or wrongly shaped key raises ``CheckpointError`` naming
the keys (with shapes) and the file, because a silently half-loaded backbone trains to a plausible
but much worse mIoU and is very hard to spot afterwards. Files are read with
``torch.load(weights_only=True)`` (numpy scalars and arrays allowed, as the release saved them) so a
checkpoint cannot run code on load.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from s4mc import REPO_ROOT
from s4mc.errors import CheckpointError, S4MCError

log = logging.getLogger("s4mc")

U2PL_BACKBONE_HINT = (
    "U2PL's README (https://github.com/Haochen-Wang409/U2PL#getting-started) links the deep-stem "
    "ImageNet weights resnet101.pth (and resnet50.pth); download one and set net.encoder.pretrained "
    "to its path. Or start from torchvision's ImageNet weights (downloaded once into torch's cache): "
    "--opts net.encoder.stem=torchvision net.encoder.pretrained=torchvision. "
    "To go on without ImageNet weights: --opts net.encoder.pretrained=null (random start: expect far "
    "below the published mIoU), or --opts net.encoder.type=resnet50 net.encoder.pretrained=null "
    "(a smaller encoder, quicker to train from scratch)."
)

# Top-level keys of a training checkpoint (docs/method.md: model_state, teacher_state, optimizer_state, ...).
_STATE_KEYS = {"teacher": ("teacher_state", "model_state"), "student": ("model_state", "teacher_state")}
_MAX_LISTED = 25


def _encoder_of(model: nn.Module) -> nn.Module:
    # Accept either the full SegmentationModel or a bare encoder.
    return getattr(model, "encoder", model)


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    # DDP-wrapped models save every key as "module.<name>"; strip it per key so mixed files work.
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _fmt(keys: list[str], shapes: Mapping[str, Any]) -> str:
    items = [f"{k} {list(shapes[k].shape) if hasattr(shapes[k], 'shape') else shapes[k]}" for k in keys]
    if len(items) > _MAX_LISTED:
        items = items[:_MAX_LISTED] + [f"... and {len(keys) - _MAX_LISTED} more"]
    return "\n    " + "\n    ".join(items)


# UniMatch's DeepLabV3Plus names its encoder `backbone` and keeps its head modules at the top level.
UNIMATCH_HEAD_MODULES = ("head", "reduce", "fuse", "classifier")


def is_unimatch_layout(sd: Mapping[str, Any]) -> bool:
    """Whether every key is UniMatch's (`backbone.*` or one of its head modules), `module.` stripped."""
    tops = {k.split(".", 1)[0] for k in sd}
    return bool(sd) and "backbone" in tops and tops <= {"backbone", *UNIMATCH_HEAD_MODULES}


def from_unimatch_layout(sd: Mapping[str, Any]) -> dict[str, Any]:
    """UniMatch's keys -> this package's: `backbone.` -> `encoder.`, its head modules below `decoder.`."""
    return {(f"encoder.{k[len('backbone.'):]}" if k.startswith("backbone.") else f"decoder.{k}"): v
            for k, v in sd.items()}


def to_unimatch_layout(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `from_unimatch_layout`, for a model with `net.decoder.type: deeplabv3_plus_unimatch`."""
    out = {}
    for k, v in sd.items():
        top, rest = k.split(".", 1)
        if top not in ("encoder", "decoder"):
            raise CheckpointError(f"{k}: UniMatch's layout has no place for a {top}.* key (an aux head?)")
        out[f"backbone.{rest}" if top == "encoder" else rest] = v
    return out


def _hints(missing: list[str], unexpected: list[str]) -> list[str]:
    hints = []
    if any(k.startswith("decoder.head.b0.") for k in unexpected) and any(k.startswith("decoder.aspp.") for k in missing):
        hints.append("the file holds UniMatch's DeepLabv3+: set net.decoder.type: deeplabv3_plus_unimatch")
    if any(k.startswith("decoder.aspp.") for k in unexpected) and any(k.startswith("decoder.head.b0.") for k in missing):
        hints.append("the file holds the U2PL-lineage DeepLabv3+: set net.decoder.type: deeplabv3_plus")
    if "conv1.weight" in unexpected and "conv1.0.weight" in missing:
        hints.append("the file has a 7x7 (torchvision) stem but the model a deep stem: set net.encoder.stem: torchvision")
    if "conv1.0.weight" in unexpected and "conv1.weight" in missing:
        hints.append("the file has U2PL's deep stem but the model a 7x7 stem: set net.encoder.stem: deep")
    if any(k.startswith("auxor.") for k in unexpected):
        hints.append("the checkpoint has an aux head (auxor.*): set net.aux_loss (e.g. {aux_plane: 1024, loss_weight: 0.4})")
    if any(k.startswith("auxor.") for k in missing):
        hints.append("the checkpoint has no aux head: set net.aux_loss: null")
    if any(k.startswith("decoder.representation.") for k in missing):
        hints.append("the checkpoint has no representation head: set net.decoder.kwargs.rep_head: false")
    return hints


def check_state_dict(module: nn.Module, sd: Mapping[str, Any], source: str, what: str) -> None:
    """Raise ``CheckpointError`` unless ``sd`` has exactly ``module``'s keys with the same shapes."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(
        k for k in own if k in sd and (not hasattr(sd[k], "shape") or tuple(sd[k].shape) != tuple(own[k].shape))
    )
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{what} {source} does not fit the model (strict loading):"]
    if missing:
        parts.append(f"  {len(missing)} missing key(s) (in the model, not in the file):" + _fmt(missing, own))
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s) (in the file, not in the model):" + _fmt(unexpected, sd))
    if mismatched:
        rows = [
            f"{k}: file {list(getattr(sd[k], 'shape', [])) if hasattr(sd[k], 'shape') else type(sd[k]).__name__}"
            f" vs model {list(own[k].shape)}"
            for k in mismatched
        ]
        if len(rows) > _MAX_LISTED:
            rows = rows[:_MAX_LISTED] + [f"... and {len(rows) - _MAX_LISTED} more"]
        parts.append(f"  {len(mismatched)} shape mismatch(es):\n    " + "\n    ".join(rows))
    parts += [f"  hint: {h}" for h in _hints(missing, unexpected)]
    raise CheckpointError("\n".join(parts))


def _numpy_globals() -> list:
    """The numpy objects a weights-only load may rebuild: U2PL/S4MC checkpoints hold
    ``best_miou`` as a numpy.float64 (the mean of a numpy IoU array). A file pickled under numpy 1
    names the module numpy.core, under numpy 2 numpy._core, so both names are allowed."""
    try:  # imported here: the module's name depends on the installed numpy's major version
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    allowed: list = [np.dtype, np.ndarray]
    # numpy >= 1.25 rebuilds a dtype's state through its class (numpy.dtypes.Float64DType, ...).
    allowed += [t for t in vars(getattr(np, "dtypes", object())).values() if isinstance(t, type)]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    return allowed


def load_tensor_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` that also accepts numpy scalars and arrays, and turns a
    damaged file or a refused object into a ``CheckpointError`` naming the file."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's unpickler fails with anything from IndexError to RuntimeError
        if isinstance(e, OSError):  # the file system's fault, not the file's content
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
        text = str(e)
        # torch words a refused object in several ways: a global not allowed, one from a blocked
        # module (os.system pickles as posix.system), an unexpected class.
        refused = re.search(r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+) whose module"
                            r"|but got <class '([^']+)'>", text, re.IGNORECASE)
        if refused:
            kind = next(g for g in refused.groups() if g)
            raise CheckpointError(
                f"{path} holds objects that weights-only loading refuses ({kind}): unpickling them could run "
                f"code, so the file may be unsafe. If it is from a trusted source, load it once with "
                f"torch.load(..., weights_only=False) and re-save only its tensors, numbers and strings."
            ) from e
        # torch's own text after its advice, else its first line (the advice to retry with
        # weights_only=False is wrong for a damaged file).
        detail = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        detail = detail.splitlines()[0].split(". ")[0] if detail else type(e).__name__
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint, or a damaged or truncated one ({detail})"
        ) from e


def torchvision_to_encoder(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Map a torchvision ResNet state dict onto a ``stem="torchvision"`` encoder.

    The encoder deliberately reuses torchvision's module names (``conv1``, ``bn1``, ``layerN.i.*``,
    ``downsample.0/1``), so the mapping is the identity apart from dropping the ImageNet ``fc``.
    """
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _torchvision_weights(encoder: nn.Module):
    if not hasattr(encoder, "layer1"):
        raise CheckpointError(f"net.encoder.pretrained: torchvision has ImageNet weights for resnet50/resnet101 only, "
                              f"not for a {type(encoder).__name__} encoder")
    import torchvision.models as tvm  # local import: only this path needs torchvision

    depth = tuple(len(getattr(encoder, f"layer{i}")) for i in range(1, 5))
    table = {(3, 4, 6, 3): ("resnet50", tvm.ResNet50_Weights), (3, 4, 23, 3): ("resnet101", tvm.ResNet101_Weights)}
    if depth not in table:
        raise CheckpointError(
            f"net.encoder.pretrained: torchvision has ImageNet weights for resnet50/resnet101 only; "
            f"this encoder has blocks {list(depth)}"
        )
    if getattr(encoder, "stem_type", None) != "torchvision" or getattr(encoder, "out_channels", (256,))[0] != 256:
        raise CheckpointError(
            "net.encoder.pretrained: torchvision needs net.encoder.stem: torchvision (torchvision's ResNets "
            "have a 7x7 stem) and the default width 64"
        )
    return table[depth]


# `net.encoder.pretrained: toy`: the toy's "ImageNet" encoder, built by s4mc/toy_pretrain.py
# (train_semi.py builds it on first use) and shipped in the repository.
TOY_ENCODER_NAME = "toy"
TOY_ENCODER_FILE = REPO_ROOT / "data" / "toy_pretrain" / "encoder.pth"


def toy_encoder_file() -> Path:
    """The file behind `net.encoder.pretrained: toy`; a clear error if it was never built."""
    if not TOY_ENCODER_FILE.is_file():
        raise S4MCError(f"net.encoder.pretrained: toy — {TOY_ENCODER_FILE} does not exist; build it with "
                        f"`python -m s4mc.toy_pretrain` (train_semi.py does this on first use)")
    return TOY_ENCODER_FILE


def load_backbone(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ImageNet weights into ``model.encoder`` (or ``model`` if it is an encoder), strictly.

    ``path`` is a local file in U2PL's ``resnet101.pth`` layout (encoder keys without the
    ``encoder.`` prefix), a torchvision ResNet file (for ``stem: torchvision``), or the string
    ``"torchvision"`` to fetch torchvision's IMAGENET1K_V1 weights through torchvision's loader
    (cached under ``$TORCH_HOME/hub/checkpoints``). ``fc.*`` and a ``module.`` prefix are ignored.
    """
    encoder = _encoder_of(model)
    if str(path) == "torchvision":
        name, weights_enum = _torchvision_weights(encoder)
        weights = weights_enum.IMAGENET1K_V1
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        try:
            sd = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
        except Exception as e:  # offline, proxy, corrupt download: all end the same way for the user
            raise CheckpointError(
                f"cannot get torchvision's {name} ImageNet weights ({type(e).__name__}: {e}). "
                f"Download {weights.url} on a machine with internet access and put it in {cache} "
                f"(torchvision's cache dir, $TORCH_HOME/hub/checkpoints), or set net.encoder.pretrained "
                f"to the downloaded file's path."
            ) from e
        source = f"torchvision {name} IMAGENET1K_V1 ({weights.url})"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            hint = getattr(encoder, "weights_hint", U2PL_BACKBONE_HINT)
            raise missing_backbone_file(p, hint)
        sd = load_tensor_file(p, "cpu")
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"backbone file {p} holds a {type(sd).__name__}, not a state dict")
        source = str(p)
    sd = torchvision_to_encoder(_strip_prefix(sd, "module."))
    adapt = getattr(encoder, "adapt_pretrained", None)
    if adapt is not None:  # an encoder whose release file needs its own key handling (models/xception.py)
        sd = adapt(sd)
    check_state_dict(encoder, sd, source, "backbone weights")
    encoder.load_state_dict(sd, strict=True)
    log.info("loaded backbone weights from %s (%d tensors)", source, len(sd))


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Mapping[str, Any]:
    """The dict a checkpoint file holds (weights-only load); CheckpointError naming the file otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    ckpt = load_tensor_file(p, map_location)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {p} holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def missing_backbone_file(path: Path, hint: str) -> CheckpointError:
    return CheckpointError(f"net.encoder.pretrained: backbone weights file not found: {path}. {hint}")


def check_backbone_file(net_cfg: Mapping[str, Any], hint: str | None = None) -> None:
    """Fail before anything else is built when `net.encoder.pretrained` names a file that is not
    there: the same error `load_backbone` would raise after the data loaders were set up."""
    pretrained = (net_cfg.get("encoder") or {}).get("pretrained")
    if not pretrained or pretrained in ("torchvision", TOY_ENCODER_NAME):
        return
    p = Path(pretrained).expanduser()
    if not p.is_file():
        raise missing_backbone_file(p, hint or U2PL_BACKBONE_HINT)


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, which: str = "teacher", map_location: Any = "cpu",
    checkpoint: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a project/U2PL/S4MC/UniMatch checkpoint into ``model`` strictly (for eval or fine-tuning).

    ``which="teacher"`` prefers ``teacher_state`` and falls back to ``model_state`` (e.g. a
    supervised-only checkpoint); ``which="student"`` prefers ``model_state``; ``which="auto"``
    takes the weights the run's own evaluation used (``evaluated_weights``, which this
    project's checkpoints record), else the teacher. A bare state dict is used as is.
    ``module.`` prefixes from DDP are stripped. A file in UniMatch's layout (its ``model`` entry,
    or a bare state dict, with ``backbone.``/``head.``/... keys) is mapped onto this package's
    names; it fits a model with ``net.decoder.type: deeplabv3_plus_unimatch``. Returns ``{"path",
    "state_key", "which", "epoch", "best_miou"}`` (the last two ``None`` when absent).
    ``checkpoint``: the file's dict when the caller has read it already (`read_checkpoint`), so a
    large file loads once.
    """
    if which not in (*_STATE_KEYS, "auto"):
        raise ValueError(f"which must be 'auto', 'teacher' or 'student', got {which!r}")
    p = Path(path).expanduser()
    ckpt = read_checkpoint(p, map_location) if checkpoint is None else checkpoint
    if which == "auto":
        which = ckpt.get("evaluated_weights") if ckpt.get("evaluated_weights") in _STATE_KEYS else "teacher"
    state_key = None
    # "model": UniMatch's own checkpoints (latest.pth / best.pth) keep the weights there.
    for key in _STATE_KEYS[which] + ("state_dict", "model"):
        if isinstance(ckpt.get(key), Mapping):
            state_key = key
            break
    if state_key is not None:
        if state_key != _STATE_KEYS[which][0]:
            log.info("checkpoint %s has no %s; loading %s instead", p, _STATE_KEYS[which][0], state_key)
        sd = ckpt[state_key]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt  # a bare state dict
    else:
        raise CheckpointError(
            f"checkpoint {p} has neither teacher_state/model_state/state_dict nor only tensors; "
            f"top-level keys: {sorted(map(str, ckpt))[:20]}"
        )
    sd = _strip_prefix(sd, "module.")
    if is_unimatch_layout(sd):
        sd = from_unimatch_layout(sd)
    check_state_dict(model, sd, f"{p}" + (f" [{state_key}]" if state_key else ""), "checkpoint")
    model.load_state_dict(sd, strict=True)
    log.info("loaded %s from %s", state_key or "state dict", p)
    epoch, best = ckpt.get("epoch"), ckpt.get("best_miou", ckpt.get("previous_best"))
    return {"path": str(p), "state_key": state_key, "which": {"teacher_state": "teacher", "model_state": "student"}.get(state_key, which), "epoch": None if epoch is None else int(epoch),
            "best_miou": None if best is None else float(best)}


def maybe_sync_bn(model: nn.Module, enabled: bool, distributed: bool, device: Any) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm only when it can work: CUDA under DDP, and enabled.

    SyncBatchNorm has no CPU kernel and needs a process group, so elsewhere the model keeps plain
    BatchNorm and one log line says so (the statistics are then per process, as on one GPU).
    """
    dev = torch.device(device)
    if enabled and distributed and dev.type == "cuda":
        log.info("net.sync_bn: converting BatchNorm to SyncBatchNorm")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if enabled:
        why = "not distributed" if not distributed else f"device is {dev.type}, SyncBatchNorm needs CUDA"
        log.info("net.sync_bn: keeping BatchNorm (%s)", why)
    return model
