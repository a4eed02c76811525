"""One evaluation routine, shared by training (per-epoch validation) and eval.py.

What it computes
----------------
A confusion matrix over every labelled pixel of every validation image (rows =
ground truth, columns = prediction, int64, accumulated on the evaluation device with
``torch.bincount``), and from it per-class IoU = TP / (TP + FP + FN), mIoU and pixel
accuracy. A class that appears neither in the ground truth nor in the prediction has
an undefined IoU (0/0); it is reported as NaN, marked not ``present``, and left out of
the mean. (U2PL/S4MC's own validation divided by ``union + 1e-10`` and so counted such
a class as IoU 0, which lowers mIoU on small validation sets; on full VOC/Cityscapes
val every class is present and both rules agree.)

Inference protocols (``mode``)
------------------------------
* ``whole`` (default): the full image goes through the network once per scale/flip.
* ``center_crop``: U2PL's in-training VOC protocol, which produced the published VOC
  numbers (with ``pad_label=0``; the VOC configs select best.pth by it, see
  ``training_protocols``). The image is padded symmetrically
  up to ``crop_size`` (image with 0, i.e. the mean colour after normalisation; label
  with ``pad_label``) and the centre ``crop_size`` window is kept. U2PL padded the
  label with 0 (background), so padding pixels counted as background ground truth and
  a model that predicts background there scores extra true positives; with VOC images
  (at most 500 px) and a 513 crop every image is padded, and nothing is cut away. Pass
  ``pad_label=0`` to reproduce U2PL's logged numbers; the default (the ignore index)
  scores only real pixels, which is what ``whole`` does too, so the two then differ
  only by the context the network sees at the borders.
* ``sliding``: Cityscapes protocol. Windows of ``crop_size`` move with stride
  ``ceil(crop * stride_rate)`` (the last window is aligned to the far edge), the
  softmax of every window is summed into a full-size map and divided by the number of
  windows covering each pixel. An image smaller than the window is padded with 0
  (bottom/right) and the padding is cut off again.

``scales`` (multi-scale) and ``flip`` (horizontal flip) apply on top of any mode: the
image is resized (bilinear, align_corners=True) for each scale, run through the mode's
inference, its softmax resized back, and all softmax maps (flipped ones flipped back)
are averaged.

Numerics: logits are upsampled and soft-maxed in float32 even when the model runs
under autocast (``amp_dtype``), since bf16 softmax/argmax changes predictions at
near-ties and makes results differ across devices.

Test-time refinement (``refine``): S4MC's refinement of the averaged softmax (the
release's ``refine_infer``) is applied before a second argmax; both predictions are
scored in the same pass, and the refined score is ``result.refined``.

Distributed: each rank evaluates a disjoint shard (s4mc.data's ``UnpaddedDistributedSampler``,
so every image counts exactly once, unlike ``DistributedSampler`` which repeats
images to even out the shards) and the confusion matrices are summed with
``all_reduce``.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from s4mc.pseudo_label import refine as s4mc_refine

from .errors import ConfigError, DataError

# Re-exported so callers (eval.py's save hook) find the whole evaluation surface here.
from .palette import cityscapes_palette, generate_palette, save_prediction, voc_palette  # noqa: F401

__all__ = [
    "EvalResult",
    "evaluate",
    "format_table",
    "metrics_from_confusion",
    "confusion_matrix",
    "MODES",
    "save_prediction",
    "voc_palette",
    "cityscapes_palette",
    "generate_palette",
]

MODES = ("whole", "center_crop", "sliding")


# --------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """Scores of one evaluation. IoU, mIoU and pixel accuracy are fractions in [0, 1].

    iou: per-class IoU, NaN for classes absent from both prediction and ground truth.
    present: per class, whether it counted towards ``miou``.
    confusion: int64 [C, C], rows = ground truth, columns = prediction.
    images_per_s / seconds: end-to-end (data loading included) wall time; under
        distributed evaluation, the slowest rank's time and all ranks' images.
    refined: the same scores with test-time S4MC refinement, when requested.
    options: the inference settings used (scales, flip, crop, ...), for the record.
    """

    iou: list[float]
    miou: float
    pixel_acc: float
    present: list[bool]
    confusion: np.ndarray
    num_images: int
    images_per_s: float
    seconds: float
    mode: str
    refined: "EvalResult | None" = None
    options: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.iou)

    @property
    def excluded(self) -> list[int]:
        """Indices of classes left out of the mean (absent from prediction and ground truth)."""
        return [c for c, p in enumerate(self.present) if not p]

    def to_json(self, class_names: Sequence[str] | None = None) -> dict:
        """A JSON-serialisable dict; NaN becomes None so strict JSON parsers accept it."""

        def clean(v: float):
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

        out = {
            "mode": self.mode,
            "miou": clean(self.miou),
            "pixel_acc": clean(self.pixel_acc),
            "iou": [clean(v) for v in self.iou],
            "present": list(map(bool, self.present)),
            "excluded": self.excluded,
            "num_images": int(self.num_images),
            "images_per_s": clean(self.images_per_s),
            "seconds": clean(self.seconds),
            "confusion": np.asarray(self.confusion).astype(np.int64).tolist(),
            "options": dict(self.options),
            "refined": None if self.refined is None else self.refined.to_json(class_names),
        }
        if class_names is not None:
            out["class_names"] = list(class_names)
            out["iou_by_class"] = {n: clean(v) for n, v in zip(class_names, self.iou)}
        return out


def metrics_from_confusion(confusion) -> tuple[list[float], float, float, list[bool]]:
    """(per-class IoU, mIoU, pixel accuracy, present) from a [C, C] confusion matrix.

    Computed in float64 on the host: the matrix is tiny, and int64 counts of a whole
    dataset exceed float32's exact integer range.
    """
    conf = confusion.detach().cpu().numpy() if torch.is_tensor(confusion) else np.asarray(confusion)
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    pr = conf.sum(axis=0)
    union = gt + pr - tp
    present = union > 0
    iou = np.full(len(tp), np.nan)
    iou[present] = tp[present] / union[present]
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = conf.sum()
    pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
    return [float(v) for v in iou], miou, pixel_acc, [bool(p) for p in present]


def _result(conf: torch.Tensor, *, num_images, seconds, mode, options) -> EvalResult:
    iou, miou, acc, present = metrics_from_confusion(conf)
    return EvalResult(
        iou=iou,
        miou=miou,
        pixel_acc=acc,
        present=present,
        confusion=conf.detach().cpu().numpy().astype(np.int64),
        num_images=int(num_images),
        images_per_s=(num_images / seconds) if seconds > 0 else float("nan"),
        seconds=float(seconds),
        mode=mode,
        options=dict(options),
    )


# --------------------------------------------------------------------------- confusion


def _check_labels(label: torch.Tensor, num_classes: int, ignore_index: int, ids: Sequence[str]) -> None:
    """Raise DataError naming the image and the value when a label is out of range.

    A label >= num_classes would silently land in another class's bincount slot (or
    crash far away), so it is checked here. This costs one host sync per batch,
    which is negligible next to the forward pass.
    """
    valid = label != ignore_index
    bad = valid & ((label < 0) | (label >= num_classes))
    if bool(bad.any()):
        per_image = bad.flatten(1).any(dim=1)
        b = int(torch.nonzero(per_image)[0, 0])
        value = int(label[b][bad[b]][0])
        image_id = ids[b] if b < len(ids) else f"#{b}"
        raise DataError(
            f"label value {value} in image {image_id!r} is outside [0, {num_classes - 1}] "
            f"and is not the ignore index {ignore_index}"
        )


def confusion_matrix(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    ids: Sequence[str] | None = None,
) -> torch.Tensor:
    """int64 [C, C] confusion matrix (rows = ground truth) of one batch, on pred's device.

    Pixels whose label is ignore_index are skipped. Raises DataError when shapes differ
    or a label lies outside [0, C) and is not ignore_index.
    """
    ids = list(ids) if ids is not None else [f"#{i}" for i in range(pred.shape[0] if pred.dim() else 0)]
    if pred.shape != label.shape:
        raise DataError(
            f"prediction shape {tuple(pred.shape)} and label shape {tuple(label.shape)} differ "
            f"for image(s) {ids}"
        )
    label = label.long()
    _check_labels(label, num_classes, ignore_index, ids)
    valid = label != ignore_index
    # Ignored pixels go to an extra bin (index C*C) that is dropped afterwards: this
    # avoids boolean indexing, whose output size needs a host sync.
    idx = torch.where(valid, label * num_classes + pred.long(), num_classes * num_classes)
    counts = torch.bincount(idx.flatten(), minlength=num_classes * num_classes + 1)
    return counts[: num_classes * num_classes].view(num_classes, num_classes).to(torch.int64)


# --------------------------------------------------------------------------- loaders


# --------------------------------------------------------------------------- inference


def _pair(size, name: str) -> tuple[int, int]:
    if size is None:
        raise ConfigError(f"evaluation: {name} is required for this mode")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"evaluation: {name} must be an int or [h, w] of positive ints, got {size}")
    return size  # type: ignore[return-value]


class _Forward:
    """Runs the model and returns float32 softmax at the input's size."""

    def __init__(self, model, device: torch.device, amp_dtype):
        self.model = model
        self.autocast = (
            (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.model(x)
        logits = out["pred"] if isinstance(out, dict) else out
        # Upcast before resizing/softmax: see the module docstring.
        logits = logits.float()
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return torch.softmax(logits, dim=1)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    if size <= window:
        return [0]
    n = math.ceil((size - window) / stride) + 1
    # The last window is shifted back to end at the border instead of running over it.
    return [min(i * stride, size - window) for i in range(n)]


def _sliding(forward: _Forward, x: torch.Tensor, crop: tuple[int, int], stride_rate: float) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = crop
    # Pad images smaller than the window (bottom/right, value 0 = mean colour) so the
    # network always sees window-sized inputs, as in training.
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
    H, W = x.shape[-2:]
    sh, sw = max(1, math.ceil(ch * stride_rate)), max(1, math.ceil(cw * stride_rate))
    acc = None
    count = torch.zeros((1, 1, H, W), device=x.device, dtype=torch.float32)
    for y0 in _window_starts(H, ch, sh):
        for x0 in _window_starts(W, cw, sw):
            prob = forward(x[:, :, y0 : y0 + ch, x0 : x0 + cw])
            if acc is None:  # the class count is only known after the first forward
                acc = torch.zeros((b, prob.shape[1], H, W), device=x.device, dtype=torch.float32)
            acc[:, :, y0 : y0 + ch, x0 : x0 + cw] += prob
            count[:, :, y0 : y0 + ch, x0 : x0 + cw] += 1
    return (acc / count)[:, :, :h, :w]


def _predict_probs(
    forward: _Forward,
    x: torch.Tensor,
    *,
    sliding: bool,
    crop: tuple[int, int] | None,
    stride_rate: float,
    scales: Sequence[float],
    flip: bool,
) -> torch.Tensor:
    """Average float32 softmax over scales (and flips), at x's size."""
    h, w = x.shape[-2:]
    total = None
    views = 0
    for s in scales:
        if s == 1.0:
            xs = x
        else:
            size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        for flipped in (False, True) if flip else (False,):
            xi = xs.flip(-1) if flipped else xs
            prob = _sliding(forward, xi, crop, stride_rate) if sliding else forward(xi)
            if flipped:
                prob = prob.flip(-1)
            if prob.shape[-2:] != (h, w):
                prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=True)
            total = prob if total is None else total + prob
            views += 1
    return total if views == 1 else total / views


def _center_crop(image: torch.Tensor, label: torch.Tensor, crop: tuple[int, int], pad_label: int):
    """U2PL's centre crop: pad symmetrically up to the crop, then keep the centre window."""
    h, w = image.shape[-2:]
    ch, cw = crop
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        border = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        image = F.pad(image, border, value=0.0)
        label = F.pad(label, border, value=pad_label)
        h, w = image.shape[-2:]
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return image[..., y0 : y0 + ch, x0 : x0 + cw], label[..., y0 : y0 + ch, x0 : x0 + cw]


def _resolve_refine(refine, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """None/False -> off; True -> S4MC defaults; dict -> kwargs for method.refine; callable -> used as is."""
    if refine is None or refine is False:
        return None
    if callable(refine):
        return refine
    if refine is True:
        kwargs: dict[str, Any] = {}
    elif isinstance(refine, dict):
        kwargs = dict(refine)
    else:
        raise ConfigError(f"evaluation.refine must be a bool, dict or callable, got {refine!r}")
    # Imported here: method.py is optional for plain evaluation and must not be a
    # hard import-time dependency of this module.

    # method.refine wants the prior as a tensor next to the probabilities; lists from a
    # config are converted once here rather than per image.
    prior = kwargs.get("prior")
    if isinstance(prior, (list, tuple, np.ndarray)):
        kwargs["prior"] = torch.as_tensor(np.asarray(prior, dtype=np.float32), device=device)
    elif torch.is_tensor(prior):
        kwargs["prior"] = prior.to(device=device, dtype=torch.float32)
    return lambda prob: s4mc_refine(prob, **kwargs)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_save(pred: torch.Tensor, num_classes: int) -> np.ndarray:
    arr = pred.detach().cpu().numpy()
    return arr.astype(np.uint8 if num_classes <= 256 else np.int32)


# --------------------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict],
    *,
    num_classes: int,
    ignore_index: int = 255,
    mode: str = "whole",
    crop_size: int | Sequence[int] | None = None,
    stride_rate: float = 2 / 3,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    refine: bool | dict | Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    save_fn: Callable[[str, np.ndarray, torch.Tensor], Any] | None = None,
    distributed: bool | None = None,
    amp_dtype: torch.dtype | None = None,
    pad_label: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` on every batch of ``loader``; see the module docstring.

    model(x) returns logits [B, C, h, w] at any resolution, or a dict with them under
    "pred". The loader yields ``{"image": float[B,3,H,W], "label": long[B,H,W],
    "id": list[str]}``. The model is put in eval mode and its previous mode restored.

    mode: "whole" | "center_crop" | "sliding". crop_size (int or [h, w]) is required
        by the last two. stride_rate: sliding stride as a fraction of the window.
    scales, flip: multi-scale / horizontal-flip softmax averaging.
    refine: None/False, True (S4MC defaults), a dict of ``s4mc.pseudo_label.refine`` kwargs
        (neighbors, k, prior), or a callable prob -> prob. Scored separately in
        ``result.refined`` from the same forward passes.
    device: where inputs go; default the model's. distributed: all-reduce the
        confusion matrices; default when torch.distributed is initialised with more
        than one rank (each rank must then pass its own shard, see s4mc.data.build_val_loader).
    save_fn(id, pred_hw, image_chw): called per image with the prediction (uint8 when
        C <= 256) and the still normalised input image on the CPU, both at the image's own
        size (under center_crop, a whole-image prediction made for the purpose).
    amp_dtype: run the model under autocast with this dtype; scoring stays float32.
    pad_label: label for center_crop padding; default ignore_index (U2PL used 0).
    """
    if mode not in MODES:
        raise ConfigError(f"evaluation.mode must be one of {MODES}, got {mode!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"evaluation: num_classes must be a positive int, got {num_classes!r}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ConfigError(f"evaluation.scales must be a non-empty list of positive numbers, got {scales}")
    if not 0 < float(stride_rate) <= 1:
        raise ConfigError(f"evaluation.stride_rate must lie in (0, 1], got {stride_rate}")
    crop = _pair(crop_size, "crop_size") if mode in ("center_crop", "sliding") else None
    if pad_label is None:
        pad_label = ignore_index

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    elif distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("evaluate(distributed=True) needs an initialised torch.distributed process group")

    device = torch.device(device) if device is not None else _model_device(model)
    forward = _Forward(model, device, amp_dtype)
    refine_fn = _resolve_refine(refine, device)
    options = {
        "scales": list(scales),
        "flip": bool(flip),
        "crop_size": list(crop) if crop else None,
        "stride_rate": float(stride_rate) if mode == "sliding" else None,
        "pad_label": int(pad_label) if mode == "center_crop" else None,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else None,
    }

    conf = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    conf_ref = torch.zeros_like(conf) if refine_fn is not None else None
    num_images = 0
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for batch in loader:
            if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
                raise DataError("evaluate: loader batches must be dicts with 'image' and 'label' (and 'id')")
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True).long()
            ids = [str(i) for i in batch.get("id", [])] or [f"#{num_images + i}" for i in range(image.shape[0])]
            if image.dim() != 4 or label.dim() != 3 or label.shape != (image.shape[0],) + image.shape[-2:]:
                raise DataError(
                    f"image {tuple(image.shape)} and label {tuple(label.shape)} do not match "
                    f"(expected [B,3,H,W] and [B,H,W]) for image(s) {ids}"
                )
            full_image = image
            if mode == "center_crop":
                image, label = _center_crop(image, label, crop, pad_label)
            prob = _predict_probs(
                forward, image, sliding=(mode == "sliding"), crop=crop, stride_rate=stride_rate, scales=scales, flip=flip
            )
            if prob.shape[1] != num_classes:
                raise DataError(
                    f"model predicts {prob.shape[1]} classes but num_classes={num_classes} (image(s) {ids})"
                )
            pred = prob.argmax(dim=1)
            conf += confusion_matrix(pred, label, num_classes, ignore_index, ids)
            if refine_fn is not None:
                pred_ref = refine_fn(prob).float().argmax(dim=1)
                conf_ref += confusion_matrix(pred_ref, label, num_classes, ignore_index, ids)
            if save_fn is not None:
                saved_pred, saved_image = pred, image
                if mode == "center_crop":
                    # The crop only serves U2PL's scoring; a written prediction covers the image at
                    # its own size, so it is predicted whole (as eval.py --images does).
                    saved_image = full_image
                    saved_pred = _predict_probs(forward, full_image, sliding=False, crop=None,
                                                stride_rate=stride_rate, scales=scales, flip=flip).argmax(dim=1)
                image_cpu = saved_image.detach().cpu()
                for b, image_id in enumerate(ids):
                    save_fn(image_id, _to_save(saved_pred[b], num_classes), image_cpu[b])
            num_images += image.shape[0]
    finally:
        model.train(was_training)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    if distributed:
        conf, conf_ref, num_images, seconds = _reduce(conf, conf_ref, num_images, seconds)

    result = _result(conf, num_images=num_images, seconds=seconds, mode=mode, options=options)
    if conf_ref is not None:
        result.refined = _result(conf_ref, num_images=num_images, seconds=seconds, mode=mode, options={**options, "refine": True})
    return result


def _reduce(conf, conf_ref, num_images: int, seconds: float):
    """Sum confusion matrices and image counts over ranks; take the slowest rank's time."""
    comm_device = conf.device
    if dist.get_backend() == "nccl" and comm_device.type != "cuda":
        comm_device = torch.device("cuda", torch.cuda.current_device())
    stacked = torch.stack([conf] if conf_ref is None else [conf, conf_ref]).to(comm_device)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    n = torch.tensor([num_images], dtype=torch.int64, device=comm_device)
    dist.all_reduce(n, op=dist.ReduceOp.SUM)
    t = torch.tensor([seconds], dtype=torch.float64, device=comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    conf = stacked[0].to(conf.device)
    conf_ref = stacked[1].to(conf.device) if conf_ref is not None else None
    return conf, conf_ref, int(n.item()), float(t.item())


# --------------------------------------------------------------------------- reporting


def format_table(result: EvalResult, class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU table (percent), ending with pixel accuracy, excluded classes and mIoU.

    With a refined result, a second column shows the refined IoUs.
    """
    n = result.num_classes
    if class_names is None:
        class_names = [f"class {i}" for i in range(n)]
    if len(class_names) != n:
        raise ValueError(f"format_table: {len(class_names)} class names for {n} classes")
    ref = result.refined
    width = max(12, max(len(str(c)) for c in class_names) + 2)

    def pct(v: float) -> str:
        return f"{'-':>8}" if math.isnan(v) else f"{100 * v:8.2f}"

    header = f"{'class':<{width}}{'IoU':>8}" + (f"{'refined':>10}" if ref else "")
    lines = [f"evaluation ({result.mode}, {result.num_images} images, {result.images_per_s:.2f} img/s)", header]
    lines.append("-" * len(header))
    for c, name in enumerate(class_names):
        row = f"{str(name):<{width}}{pct(result.iou[c])}"
        if ref:
            row += f"  {pct(ref.iou[c])}"
        if not result.present[c]:
            row += "  (absent)"
        lines.append(row)
    lines.append("-" * len(header))
    acc = f"{'pixel acc':<{width}}{pct(result.pixel_acc)}" + (f"  {pct(ref.pixel_acc)}" if ref else "")
    lines.append(acc)
    excluded = [str(class_names[c]) for c in result.excluded]
    lines.append(
        "excluded from mIoU (absent from prediction and ground truth): " + (", ".join(excluded) if excluded else "none")
    )
    counted = n - len(excluded)
    miou = f"{'mIoU':<{width}}{pct(result.miou)}" + (f"  {pct(ref.miou)}" if ref else "")
    lines.append(f"{miou}   (mean over {counted} of {n} classes)")
    return "\n".join(lines)


def training_protocols(cfg: dict) -> list[str]:
    """The evaluation modes training runs: the first selects best.pth, the others are logged beside it.

    `dataset.val.crop.type: center` makes the selecting one U2PL's centre crop
    (`dataset.val.crop.size`, padding labelled `dataset.val.crop.pad_label`): the
    in-training protocol behind the published VOC numbers. `evaluation.mode` (whole
    image, say) is then computed too. With `none`, `evaluation.mode` alone is run.
    """
    mode = cfg["evaluation"]["mode"]
    if cfg["dataset"]["val"]["crop"]["type"] == "center" and mode != "center_crop":
        return ["center_crop", mode]
    return [mode]


def protocol_name(cfg: dict, mode: str) -> str:
    """A mode as logs and eval.py name it: `center_crop (513×513, padding labelled 0)`, `whole`,
    `sliding (769×769)`; the same words as the run header's evaluation line."""
    if mode == "whole":
        return "whole"
    h, w = _pair(cfg["evaluation"]["crop_size"] or cfg["dataset"]["val"]["crop"]["size"], "crop_size")
    if mode == "center_crop":
        return f"center_crop ({h}×{w}, padding labelled {cfg['dataset']['val']['crop']['pad_label']})"
    return f"{mode} ({h}×{w})"


def evaluate_configured(model, loader, cfg: dict, *, device=None, amp_dtype=None, prior=None,
                        distributed: bool | None = None, save_fn=None, mode: str | None = None) -> EvalResult:
    """`evaluate` with the protocol a config describes (its `evaluation` block).

    Training and eval.py both call this, so the two can never evaluate differently.
    `mode` replaces `evaluation.mode` (training runs each of `training_protocols(cfg)`).
    """
    ev = cfg["evaluation"]
    refine = _configured_refine(cfg, prior) if ev["refine"] else None
    return evaluate(
        model, loader, num_classes=cfg["net"]["num_classes"], ignore_index=cfg["dataset"]["ignore_index"],
        mode=mode or ev["mode"], crop_size=ev["crop_size"] or cfg["dataset"]["val"]["crop"]["size"],
        stride_rate=ev["stride_rate"], scales=ev["scales"], flip=ev["flip"], refine=refine, device=device,
        save_fn=save_fn, distributed=distributed, amp_dtype=amp_dtype,
        pad_label=cfg["dataset"]["val"]["crop"]["pad_label"],
    )


def _configured_refine(cfg: dict, prior) -> dict:
    """The training config's refinement settings, for test-time refinement."""
    unsup = cfg["trainer"]["unsupervised"]
    return {"neighbors": unsup["neighborhood_size"], "k": unsup["num_neighbors"], "prior": prior}


def configured_inference(model, cfg: dict, *, device=None, amp_dtype=None,
                         prior=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The config's inference protocol as a function: normalised images [B, 3, H, W] ->
    float32 class probabilities [B, C, H, W] at the images' own size.

    The same forward, sliding window, scales and flips as `evaluate_configured`, for images
    without labels (eval.py --images). `center_crop` predicts the whole image: its crop exists
    to score U2PL's protocol, and a prediction must cover every pixel. With
    `evaluation.refine` the probabilities are S4MC's refined ones (not renormalised; only
    their argmax is meant to be used).
    """
    ev = cfg["evaluation"]
    sliding = ev["mode"] == "sliding"
    crop = _pair(ev["crop_size"] or cfg["dataset"]["val"]["crop"]["size"], "crop_size") if sliding else None
    scales = tuple(float(s) for s in ev["scales"])
    if not scales or min(scales) <= 0:
        raise ConfigError(f"evaluation.scales must be a non-empty list of positive numbers, got {scales}")
    if not 0 < float(ev["stride_rate"]) <= 1:
        raise ConfigError(f"evaluation.stride_rate must lie in (0, 1], got {ev['stride_rate']}")
    device = torch.device(device) if device is not None else _model_device(model)
    forward = _Forward(model, device, amp_dtype)
    refine_fn = _resolve_refine(_configured_refine(cfg, prior), device) if ev["refine"] else None

    @torch.no_grad()
    def infer(image: torch.Tensor) -> torch.Tensor:
        prob = _predict_probs(forward, image.to(device), sliding=sliding, crop=crop,
                              stride_rate=float(ev["stride_rate"]), scales=scales, flip=ev["flip"])
        return refine_fn(prob).float() if refine_fn is not None else prob

    return infer
