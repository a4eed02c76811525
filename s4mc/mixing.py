"""CutMix, ClassMix and Cutout for the student's strong view (docs/method.md step 2).

A mix is described by a boolean mask [B,H,W]; True means "this pixel comes from the
partner" (sample (i+1) mod B unless a partner batch is given), or for Cutout "this pixel
is erased". Sampling the mask and applying it are separate so that images, pseudo-labels
and ground truth all receive exactly the same mix.

All randomness comes from a caller-provided CPU torch.Generator, so runs are
reproducible and each rank can be seeded differently.
"""
import torch

from .errors import ConfigError

MODES = ("cutmix", "classmix", "cutout", "none")


def _draw(low, high, generator):
    """An integer uniform in [low, high), from the generator."""
    return int(torch.randint(low, high, (1,), generator=generator))


def _half_area_box(height, width, generator):
    """(y0, y1, x0, x1) of a box covering half the image: width uniform in (W/2, W)."""
    low = width // 2 + 1
    box_w = _draw(low, width, generator) if low < width else width
    box_h = min(max(round(height * width / 2 / box_w), 1), height)
    x0 = _draw(0, width - box_w + 1, generator)
    y0 = _draw(0, height - box_h + 1, generator)
    return y0, y0 + box_h, x0, x0 + box_w


def _uniform(low, high, generator):
    return low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64))


def _unimatch_box(height, width, generator, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3)):
    """(y0, y1, x0, x1) of UniMatch's CutMix box (docs/method.md, "UniMatch release-exact", item 7):
    area U(0.02, 0.4) of the image, aspect ratio U(0.3, 1/0.3), its corner uniform over the image,
    redrawn (ratio and corner) until the box fits."""
    size = _uniform(*area, generator) * height * width
    for _ in range(10000):  # UniMatch loops without bound; its square crops fit within a few draws
        r = _uniform(*ratio, generator)
        box_w, box_h = int((size / r) ** 0.5), int((size * r) ** 0.5)
        x0, y0 = _draw(0, width, generator), _draw(0, height, generator)
        if x0 + box_w <= width and y0 + box_h <= height:
            return y0, y0 + box_h, x0, x0 + box_w
    raise ConfigError(f"UniMatch's CutMix box does not fit a {height}x{width} crop (aspect ratios 0.3-3.3 "
                      f"and up to 40% of the area need a crop closer to square)")


BOXES = {"half": _half_area_box, "unimatch": _unimatch_box}


def _class_mask(source, generator, ignore_index):
    """Pixels of `source` [H,W] whose class is one of a random half of its classes."""
    classes = torch.unique(source)
    classes = classes[classes != ignore_index]
    chosen = classes[torch.randperm(classes.numel(), generator=generator)[: classes.numel() // 2]
                     .to(classes.device)]
    return torch.isin(source, chosen)


GATES = ("batch", "sample")


def sample_mix_mask(batch, height, width, *, mode, prob=0.5, generator, pseudo_label=None,
                    partner_label=None, ignore_index=255, device=None, gate="batch", box="half"):
    """Sample a mix mask bool[B,H,W]; mixing happens with probability `prob`.

    CutMix's `box` is "half" (half the image area, as the S4MC release) or "unimatch"
    (UniMatch's distribution, `_unimatch_box`).

    `gate="batch"` flips one coin for the whole batch, as the release did: either every
    sample of the step is mixed or none is. `gate="sample"` flips one coin per sample.
    Either way each mixed sample gets its own box (or class set).

    ClassMix picks half the classes present in the partner's pseudo-label: pass the
    batch's `pseudo_label` [B,H,W] (the partner is then sample (i+1) mod B) or, with an
    explicit partner batch, its labels as `partner_label`.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mixing mode {mode!r}; expected one of {', '.join(MODES)}")
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"mix probability must lie in [0, 1], got {prob!r}")
    if gate not in GATES:
        raise ConfigError(f"unknown mix gate {gate!r}; expected one of {', '.join(GATES)}")
    if box not in BOXES:
        raise ConfigError(f"unknown CutMix box {box!r}; expected one of {', '.join(BOXES)}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"mixing needs a CPU torch.Generator, got {generator!r}")
    if device is None:
        device = pseudo_label.device if pseudo_label is not None else torch.device("cpu")
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    if mode == "none":
        return mask
    source = None
    if mode == "classmix":
        if partner_label is not None:
            source = partner_label
        elif pseudo_label is None:
            raise ValueError("classmix needs pseudo_label (or partner_label) to choose classes from")
        elif pseudo_label.shape[0] < 2:
            raise ValueError("classmix on a batch of 1 needs partner_label: an image must not be "
                             "mixed with itself")
        else:
            source = pseudo_label.roll(-1, dims=0)
        if tuple(source.shape) != (batch, height, width):
            raise ValueError(f"labels for classmix have shape {tuple(source.shape)}, "
                             f"expected {(batch, height, width)}")
    # Draw the coins up front so the generator's stream does not depend on their outcomes.
    if gate == "batch":
        mixed = (torch.rand(1, generator=generator) < prob).expand(batch)
    else:
        mixed = torch.rand(batch, generator=generator) < prob
    for i in range(batch):
        if mode == "classmix":
            chosen = _class_mask(source[i], generator, ignore_index).to(device)
        else:
            y0, y1, x0, x1 = BOXES[box](height, width, generator)
        if not mixed[i]:
            continue
        if mode == "classmix":
            mask[i] = chosen
        else:
            mask[i, y0:y1, x0:x1] = True
    return mask


def apply_mix(x, mask, partner=None, fill=None):
    """Mix images [B,C,H,W] or labels [B,H,W] with `mask` bool[B,H,W].

    With `fill` (Cutout: 0 for normalised images, the ignore index for labels) masked
    pixels are set to it; otherwise they are taken from `partner`, by default the batch
    rolled so that sample i takes from sample (i+1) mod B.
    """
    if x.dim() not in (3, 4) or mask.shape != x.shape[:1] + x.shape[-2:]:
        raise ValueError(f"mix mask {tuple(mask.shape)} does not fit a batch of shape {tuple(x.shape)}")
    mask = mask.to(x.device)
    if x.dim() == 4:
        mask = mask.unsqueeze(1)
    if fill is not None:
        return x.masked_fill(mask, fill)
    if partner is None:
        if x.shape[0] < 2:
            raise ValueError("cannot mix a batch of 1 without an explicit partner batch: "
                             "an image must not be mixed with itself")
        partner = x.roll(-1, dims=0)
    elif partner.shape != x.shape:
        raise ValueError(f"partner batch {tuple(partner.shape)} does not match {tuple(x.shape)}")
    return torch.where(mask, partner.to(x.device, x.dtype), x)


def mix(mode: str, mask, x, partner=None, fill=None):
    """`x` (images or labels) mixed by `mask` the way `mode` mixes: Cutout erases to `fill`,
    CutMix and ClassMix paste from `partner` (None: the batch rolled by one)."""
    if mode not in MODES or mode == "none":
        raise ConfigError(f"mixing mode {mode!r} does not mix; expected one of "
                          f"{', '.join(m for m in MODES if m != 'none')}")
    if mode == "cutout":
        return apply_mix(x, mask, fill=fill)
    return apply_mix(x, mask, partner=partner)
