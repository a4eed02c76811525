"""U2PL's unreliable-pseudo-label contrastive term (docs/method.md step 9, "S4MC + U2PL").

U2PL (Wang et al., CVPR 2022) adds a pixel-to-prototype InfoNCE loss on the model's
`rep` output (256 channels at 1/4 of the input size):

* **Anchors** (student features) are reliable pixels of class c: labeled pixels whose
  ground truth is c, and unlabeled pixels whose pseudo-label is c and whose teacher
  entropy is in the lowest ``alpha_t`` percent. Only pixels where the teacher gives c
  more than ``current_class_threshold`` become anchors; ``num_queries`` of them are
  drawn per class, with replacement.
* **The positive** is the class prototype: the mean teacher feature over all reliable
  pixels of class c.
* **Negatives** (teacher features) for class c are pixels that are not c but could be
  confused with it. A labeled pixel qualifies when its ground truth is not c and c is
  in the teacher's top ``low_rank``. An unlabeled pixel qualifies when it is
  unreliable (entropy in the highest percent, see below) and c is ranked in
  ``[low_rank, high_rank)`` by the teacher. They are pushed into a per-class FIFO
  memory bank (:class:`ContrastiveMemory`), and ``num_negatives`` per anchor are drawn
  from the bank.
* The loss is cross-entropy over the cosine similarities / ``temperature``, with the
  positive at index 0, averaged over anchors. It is summed over the classes that have
  anchors and a non-empty bank, and divided by the number of classes present in the
  batch (U2PL's normalisation).

Entropy schedule: ``alpha_t = low_entropy_threshold * (1 - epoch / epochs)``. Reliable
means entropy <= percentile(alpha_t). Unreliable means entropy >= percentile(beta_t),
with ``beta_t = 100 - (100 - unsupervised_entropy_ignore) * (1 - epoch / epochs)``.
The release hard-coded ``100 - alpha_t`` here and never read
``unsupervised_entropy_ignore``. With the release values (20 and 80) both formulas give
the same numbers, and the key now has a meaning instead of being silently ignored.

Deliberate departures from the release code, all of which are bugs reported on
U2PL's tracker. ``release_exact=True`` (``trainer.contrastive.release_exact``) puts each
of them back, so the term computes what the S4MC release computed:

* Labeled negatives: the release multiplied a "label is c" mask by a "label is not c"
  mask, so labeled pixels never became negatives (U2PL issue #171). Unlabeled
  negatives had the same contradiction against the pseudo-label, so the bank was
  filled only where the two teacher passes disagreed. Here the masks follow the
  paper's definition. *Release-exact:* a negative for class c must carry label c (ground
  truth or pseudo-label), so labeled pixels never qualify, and an unlabeled pixel
  qualifies when its pseudo-label is c while the teacher's second forward ranks c in
  ``[low_rank, high_rank)``.
* The release indexed anchors by position in its list of present classes, not by class
  id (issue #111), so a class's anchors could meet another class's prototype and bank.
  Here anchor, positive and negatives always belong to the same class. *Release-exact:*
  with ``v_0 < v_1 < ...`` the classes present in the batch, the j-th term takes its
  anchors and its positive from class j (the id, not ``v_j``) and its negatives from
  ``v_j``'s bank; it is skipped when class j has no anchor or ``v_j``'s bank is empty.
  Classes with an id at or above the number of classes present never give anchors.
* Ranks are clamped to the number of classes, so 2- and 3-class tasks get negatives.
  With ``low_rank=3`` the release's term was always 0 on them (issues #17, #142).
  Details are in :meth:`ContrastiveSettings.ranks_for`. *Release-exact:* the ranks are
  used as configured, so with C <= low_rank no unlabeled pixel is ever a negative.
* The release divided the term by the world size. DDP already averages gradients, so
  that only shrank the weight; it is not done here. *Release-exact:* the gradient is
  that of ``loss / world_size``, and the value is the mean over the ranks (the release
  all-reduced the value before dividing); with one process nothing changes.

Also under ``release_exact``: the unreliable percentile is ``100 - alpha_t`` (the
release's formula), so ``unsupervised_entropy_ignore`` is not read. What remains
different from the release in that mode is numerical detail, not behaviour: entropy
and its percentiles are taken at the ``rep`` resolution (the release took them at the
crop size and downsampled the masks), and labels are resized on the align-corners grid
(the release used ``F.interpolate(mode="nearest")``).

Kept from the release: a batch with fewer than ``min_present_classes`` (2) classes
present gives 0, and ``current_class_negative_threshold`` (1 = no filter) still limits
negatives to pixels where p_c is below it.

Numerics: softmax outputs, entropy, percentiles and similarities are computed in
fp32/fp64 with autocast disabled, even when the model runs in bf16/fp16. All
randomness comes from an explicit ``torch.Generator``. The only host syncs are the
ones needed to enqueue a variable number of negatives.

The training step reaches this through the term plug-in, s4mc/terms/contrastive.py: it builds
the settings and the memory bank from the config block and calls `contrastive_loss` once per
semi-supervised step; checkpoints keep the bank's `state_dict()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from s4mc.errors import CheckpointError
from s4mc.percentile import masked_percentile
from s4mc.schema import NUM, key

__all__ = [
    "ContrastiveSettings",
    "ContrastiveMemory",
    "contrastive_loss",
    "entropy_percentiles_at",
    "all_gather_rows",
]

GatherFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- settings


# The term's config block (`trainer.terms.contrastive`, or the release's `trainer.contrastive`):
# the one place its defaults (the U2PL/S4MC release values), types and bounds are written.
SETTINGS = {
    "loss_weight": key(1.0, *NUM, low=0),
    "negative_high_entropy": key(True, bool),
    "low_rank": key(3, int, low=1),
    "high_rank": key(20, int, low=2),  # and above low_rank (s4mc/terms/contrastive.py checks it)
    "current_class_threshold": key(0.3, *NUM, low=0, high=1),
    "current_class_negative_threshold": key(1.0, *NUM, low=0, high=1),
    "unsupervised_entropy_ignore": key(80.0, *NUM, low=0, high=100),
    "low_entropy_threshold": key(20.0, *NUM, low=0, high=100),
    "num_negatives": key(50, int, low=1),
    "num_queries": key(256, int, low=1),
    "temperature": key(0.5, *NUM, low=1e-12),  # > 0
    "memory_capacity": key(30000, int, low=1),
    # true: the term as the release computed it, U2PL's four bugs included (module docstring).
    "release_exact": key(False, bool),
}


def _default(name: str):
    return SETTINGS[name].default


@dataclass(frozen=True)
class ContrastiveSettings:
    """The term's config block as values; the defaults are SETTINGS'."""

    loss_weight: float = _default("loss_weight")
    negative_high_entropy: bool = _default("negative_high_entropy")
    low_rank: int = _default("low_rank")
    high_rank: int = _default("high_rank")
    current_class_threshold: float = _default("current_class_threshold")
    current_class_negative_threshold: float = _default("current_class_negative_threshold")
    unsupervised_entropy_ignore: float = _default("unsupervised_entropy_ignore")
    low_entropy_threshold: float = _default("low_entropy_threshold")
    num_negatives: int = _default("num_negatives")
    num_queries: int = _default("num_queries")
    temperature: float = _default("temperature")
    # U2PL hard-coded a queue of 30000 per class (memory_capacity) and returned 0 when a batch had
    # fewer than two classes present (min_present_classes, not a config key).
    memory_capacity: int = _default("memory_capacity")
    min_present_classes: int = 2
    ignore_index: int = 255
    # True: the four U2PL bugs the release computed with (module docstring) are kept.
    release_exact: bool = _default("release_exact")

    @classmethod
    def from_config(cls, block: Optional[Mapping[str, Any]]) -> "ContrastiveSettings":
        """The settings of a validated `trainer.contrastive` block (None: all defaults).

        SETTINGS owns the keys' defaults, types and bounds; this only carries the values over.
        """
        if block is None:
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in block.items() if key in fields})

    def ranks_for(self, num_classes: int) -> tuple[int, int, int]:
        """Effective ``(labeled_low_rank, unlabeled_low_rank, high_rank)`` for C classes.

        * Labeled pixel, class c is a negative when c is in the teacher's top
          ``labeled_low_rank`` (and is not the ground truth). This is clamped to C: with
          2 classes every other class is "hard to tell apart", which is the rule's intent.
        * Unlabeled pixel, c is a negative when its rank is in
          ``[unlabeled_low_rank, high_rank)``. The lower end is clamped to C-1, so that
          at least the least likely class can be a negative (for C=2 that is rank 1,
          U2PL's own advice for binary tasks). The upper end is clamped to C and kept
          above the lower end.

        With C >= high_rank this returns exactly (low_rank, low_rank, high_rank), which is
        also what ``release_exact`` returns for every C (ranks above C select nothing).
        """
        if num_classes < 2:
            raise ValueError(f"contrastive term needs at least 2 classes, got {num_classes}")
        if self.release_exact:
            return self.low_rank, self.low_rank, self.high_rank
        low_l = min(self.low_rank, num_classes)
        low_u = min(self.low_rank, num_classes - 1)
        high = max(min(self.high_rank, num_classes), low_u + 1)
        return low_l, low_u, high


def entropy_percentiles_at(settings: ContrastiveSettings, epoch: float, epochs: float) -> tuple[float, float]:
    """Percentiles ``(alpha_t, beta_t)`` that separate reliable from unreliable pixels.

    A pixel is reliable when its entropy is <= percentile alpha_t, and unreliable when it is
    >= percentile beta_t. Both tighten linearly to the extremes (0 and 100) over training,
    as in U2PL: early on, many pseudo-labels are trusted as anchors and many are used as
    negatives. ``epoch`` may be fractional, for a per-iteration schedule.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    remaining = min(max(1.0 - float(epoch) / float(epochs), 0.0), 1.0)
    alpha = settings.low_entropy_threshold * remaining
    if settings.release_exact:
        return alpha, 100.0 - alpha
    beta = 100.0 - (100.0 - settings.unsupervised_entropy_ignore) * remaining
    return alpha, beta


# --------------------------------------------------------------------------- DDP helper


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a [N_rank, ...] tensor from every rank along dim 0 (N may differ by rank).

    Use this as ``ContrastiveMemory(gather=all_gather_rows)`` under DDP, so every rank's bank
    holds the same negatives (as in U2PL). It is a collective, so every rank must call it,
    and :func:`contrastive_loss` does so on every call, even when a rank has no negatives.
    When torch.distributed is not initialised, or the world has one rank, the tensor is
    returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    # all_gather needs equal shapes, so exchange the row counts first and pad to the max.
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    max_n = max(sizes)
    padded = tensor.new_zeros((max_n, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


# --------------------------------------------------------------------------- memory bank


class ContrastiveMemory:
    """Per-class FIFO queues of negative features (teacher `rep` vectors).

    Each class keeps at most ``capacity`` rows; when a queue is full, new rows overwrite the
    oldest. Storage is a ring buffer, because shifting a full 30000x256 queue for every
    class on every iteration copies 30 MB per class. A queue's buffer grows by doubling,
    so rare classes do not pin ``capacity`` rows each.

    The bank also owns a CPU ``torch.Generator`` (``seed``). :func:`contrastive_loss` uses it
    when the caller passes no generator, and its state is part of :meth:`state_dict`, so a
    resumed run continues the same random stream. Under DDP, give each rank a different
    seed (e.g. ``seed + rank``) so that the ranks draw different anchors.

    ``device``: where the queues live. None means the device of the first features pushed.
    ``dtype``: storage dtype. fp32 by default; bf16 halves memory (21 classes x 30000 x 256
    is 645 MB in fp32). Sampled rows are returned in fp32.
    ``gather``: called on a packed [N, D+1] fp32 tensor (features, then the class id in the
    last column) before it is enqueued. The default is the identity; use
    :func:`all_gather_rows` under DDP.
    """

    def __init__(
        self,
        num_classes: int,
        capacity: int = 30000,
        *,
        feature_dim: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
        gather: Optional[GatherFn] = None,
        seed: int = 0,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.num_classes = int(num_classes)
        self.capacity = int(capacity)
        self.feature_dim = feature_dim
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.gather: GatherFn = gather if gather is not None else (lambda t: t)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        self._storage: list[Optional[torch.Tensor]] = [None] * self.num_classes
        self._size = [0] * self.num_classes  # valid rows, <= capacity
        self._ptr = [0] * self.num_classes  # next row to write (== size until the queue is full)

    # -- inspection -----------------------------------------------------------------

    def size(self, class_id: int) -> int:
        return self._size[class_id]

    @property
    def sizes(self) -> list[int]:
        return list(self._size)

    def features(self, class_id: int) -> torch.Tensor:
        """The queue of one class, oldest row first (a copy), shape [size, D]."""
        buf, n = self._storage[class_id], self._size[class_id]
        if buf is None or n == 0:
            dim = self.feature_dim or 0
            return torch.zeros((0, dim), dtype=self.dtype, device=self.device or "cpu")
        if n < self.capacity:
            return buf[:n].clone()
        p = self._ptr[class_id]
        return torch.cat([buf[p:], buf[:p]], dim=0)

    # -- writing --------------------------------------------------------------------

    def _check_dim(self, dim: int) -> None:
        if self.feature_dim is None:
            self.feature_dim = dim
        elif dim != self.feature_dim:
            raise ValueError(f"feature dim {dim} does not match the memory bank's {self.feature_dim}")

    def push(self, class_id: int, feats: torch.Tensor) -> None:
        """Append rows [N, D] to one class's queue (no gather), dropping the oldest when full."""
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"class id {class_id} out of range [0, {self.num_classes})")
        if feats.dim() != 2:
            raise ValueError(f"expected [N, D] features, got shape {tuple(feats.shape)}")
        self._check_dim(feats.shape[1])
        k = feats.shape[0]
        if k == 0:
            return
        if self.device is None:
            self.device = feats.device
        feats = feats.detach().to(device=self.device, dtype=self.dtype)
        cap = self.capacity
        if k >= cap:
            # Only the newest `cap` rows survive; write them in order and restart the ring.
            buf = self._ensure_rows(class_id, cap)
            buf.copy_(feats[-cap:])
            self._size[class_id], self._ptr[class_id] = cap, 0
            return
        size, ptr = self._size[class_id], self._ptr[class_id]
        buf = self._ensure_rows(class_id, min(size + k, cap))
        first = min(k, cap - ptr)
        buf[ptr : ptr + first] = feats[:first]
        if first < k:  # wrap around; only possible once the queue is full (ptr+k > cap)
            buf[: k - first] = feats[first:]
        self._ptr[class_id] = (ptr + k) % cap
        self._size[class_id] = min(size + k, cap)

    def _ensure_rows(self, class_id: int, rows: int) -> torch.Tensor:
        buf = self._storage[class_id]
        have = 0 if buf is None else buf.shape[0]
        if have >= rows:
            return buf
        new_rows = min(self.capacity, max(rows, 2 * have))
        new = torch.empty((new_rows, self.feature_dim), dtype=self.dtype, device=self.device)
        if buf is not None and self._size[class_id] > 0:
            # Growth only happens while the queue is not yet full, when rows [0, size) are
            # in chronological order, so a prefix copy keeps the FIFO order.
            new[: self._size[class_id]] = buf[: self._size[class_id]]
        self._storage[class_id] = new
        return new

    def enqueue(self, feats: torch.Tensor, class_ids: torch.Tensor) -> int:
        """Gather (via the hook) and push rows ``feats[i]`` into queue ``class_ids[i]``.

        Calls the gather hook exactly once, even with zero rows, so collectives stay matched
        across ranks. Returns the number of rows enqueued after the gather.
        """
        if feats.dim() != 2 or class_ids.dim() != 1 or feats.shape[0] != class_ids.shape[0]:
            raise ValueError(f"expected feats [N, D] and class_ids [N], got {tuple(feats.shape)} and {tuple(class_ids.shape)}")
        self._check_dim(feats.shape[1])
        # One packed tensor, so a DDP gather is one collective instead of one per class.
        # Class ids below 2**24 are exact in fp32.
        packed = torch.cat([feats.detach().float(), class_ids.to(feats.device, torch.float32)[:, None]], dim=1)
        packed = self.gather(packed)
        if packed.shape[0] == 0:
            return 0
        ids = packed[:, -1].round().long()
        rows = packed[:, :-1]
        # A stable sort keeps each class's rows in arrival order, which is the FIFO order.
        order = torch.sort(ids, stable=True).indices
        ids, rows = ids[order], rows[order]
        counts = torch.bincount(ids, minlength=self.num_classes).tolist()
        if len(counts) > self.num_classes:
            raise ValueError(f"class id {len(counts) - 1} out of range [0, {self.num_classes})")
        start = 0
        for c, n in enumerate(counts):
            if n:
                self.push(c, rows[start : start + n])
            start += n
        return int(packed.shape[0])

    def sample(self, class_id: int, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw ``n`` rows of one class's queue uniformly with replacement, as fp32 [n, D]."""
        size = self._size[class_id]
        if size == 0:
            raise ValueError(f"memory bank for class {class_id} is empty")
        g = generator if generator is not None else self.generator
        idx = torch.randint(size, (n,), generator=g, device=g.device).to(self.device)
        return self._storage[class_id].index_select(0, idx).float()

    def clear(self) -> None:
        self._storage = [None] * self.num_classes
        self._size = [0] * self.num_classes
        self._ptr = [0] * self.num_classes

    def to(self, device: torch.device | str) -> "ContrastiveMemory":
        self.device = torch.device(device)
        self._storage = [None if b is None else b.to(self.device) for b in self._storage]
        return self

    # -- checkpointing ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain ints only, so it loads with ``torch.load(..., weights_only=True)``.

        Queues are stored oldest row first and trimmed to their size, so the checkpoint does
        not depend on the ring buffer's layout.
        """
        return {
            "num_classes": self.num_classes,
            "capacity": self.capacity,
            "feature_dim": -1 if self.feature_dim is None else int(self.feature_dim),
            "queues": [self.features(c) for c in range(self.num_classes)],
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore queues and RNG state. The class count must match; the capacity may differ
        (queues longer than the new capacity keep their newest rows)."""
        try:
            num_classes = int(state["num_classes"])
            queues = list(state["queues"])
            feature_dim = int(state["feature_dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"contrastive memory state is malformed: {exc!r}") from exc
        if num_classes != self.num_classes or len(queues) != self.num_classes:
            raise CheckpointError(
                f"contrastive memory checkpoint has {num_classes} classes ({len(queues)} queues), the model has {self.num_classes}"
            )
        if feature_dim >= 0 and self.feature_dim is not None and feature_dim != self.feature_dim:
            raise CheckpointError(f"contrastive memory checkpoint has feature dim {feature_dim}, expected {self.feature_dim}")
        self.clear()
        if feature_dim >= 0:
            self.feature_dim = feature_dim
        for c, q in enumerate(queues):
            if not isinstance(q, torch.Tensor) or q.dim() != 2:
                raise CheckpointError(f"contrastive memory queue {c} is not a [N, D] tensor")
            if q.shape[0]:
                if self.device is None:
                    self.device = q.device
                self.push(c, q)
        if "generator_state" in state:
            self.generator.set_state(state["generator_state"].cpu())


# --------------------------------------------------------------------------- helpers


def _align_grid(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """Source indices of an align_corners=True resize from ``src`` to ``dst`` samples.

    Labels are resized with these indices, which is nearest-neighbour on the same grid that
    ``F.interpolate(..., mode="bilinear", align_corners=True)`` uses for the probabilities.
    For 513 -> 129 both pick rows 0, 4, 8, ..., so a label and its probability stay on the
    same pixel. F.interpolate's "nearest" mode uses a different grid.
    """
    if dst == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.round(torch.arange(dst, device=device, dtype=torch.float64) * ((src - 1) / (dst - 1))).long()


def _resize_labels(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    ys = _align_grid(label.shape[-2], size[0], label.device)
    xs = _align_grid(label.shape[-1], size[1], label.device)
    return label.index_select(-2, ys).index_select(-1, xs)


def _resize_probs(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    prob = prob.float()
    if tuple(prob.shape[-2:]) == tuple(size):
        return prob
    return F.interpolate(prob, size=size, mode="bilinear", align_corners=True)


def _sample_masked(mask: torch.Tensor, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``mask`` [K, N], draw ``num`` column indices uniformly among its True
    entries, with replacement. Returns ``(indices [K, num], counts [K])``.

    This uses inverse-CDF sampling on the mask's cumulative sum: u ~ U[0, 1),
    r = floor(u * count), and the r-th True entry is found with searchsorted. The number of
    valid pixels never has to reach the host. Rows with count 0 get index 0; the caller
    masks them out.
    """
    cdf = mask.long().cumsum(dim=1)
    counts = cdf[:, -1]
    u = torch.rand((mask.shape[0], num), generator=generator, device=generator.device, dtype=torch.float64).to(mask.device)
    r = torch.minimum((u * counts[:, None].double()).floor().long(), (counts - 1).clamp(min=0)[:, None])
    idx = torch.searchsorted(cdf, r, right=True)
    return idx.clamp(max=mask.shape[1] - 1), counts


# --------------------------------------------------------------------------- the loss


def contrastive_loss(
    rep_student: torch.Tensor,
    rep_teacher: torch.Tensor,
    prob_labeled: torch.Tensor,
    prob_unlabeled: torch.Tensor,
    label_labeled: torch.Tensor,
    pseudo_label_unlabeled: torch.Tensor,
    memory: ContrastiveMemory,
    settings: ContrastiveSettings | Mapping[str, Any] | None,
    epoch: float,
    epochs: float,
    *,
    generator: Optional[torch.Generator] = None,
    world_size: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """U2PL's contrastive term. Returns ``(loss, stats)``; the loss is already multiplied by
    ``settings.loss_weight`` and is ready to add to the total.

    Inputs (B_l labeled samples first, then B_u unlabeled ones, as in the student's batch):

    * ``rep_student``: [B_l + B_u, D, h, w], the student's ``rep`` on cat(labeled, strong
      unlabeled), at 1/4 of the crop size. Gradients flow into it through the anchors only.
    * ``rep_teacher``: same shape, the teacher's ``rep`` on the same batch. It is detached
      here and used for the prototypes and for the negatives pushed into ``memory``.
    * ``prob_labeled`` [B_l, C, H, W] and ``prob_unlabeled`` [B_u, C, H', W']: the teacher's
      softmax probabilities, at any resolution (usually the crop size). They are resized
      bilinearly (align_corners=True) to (h, w) here. Compute the softmax in fp32.
    * ``label_labeled`` [B_l, H, W] (ground truth) and ``pseudo_label_unlabeled`` [B_u, H', W']
      (the mixed hard pseudo-labels): long tensors, ``ignore_index`` = unused pixel. They are
      resized to (h, w) by nearest neighbour on the same aligned grid.
    * ``memory``: the bank. It is updated in place (teacher negatives enqueued) before the
      negatives are sampled, as in U2PL.
    * ``settings``: a :class:`ContrastiveSettings`, or the config dict (``trainer.contrastive``).
    * ``epoch`` / ``epochs``: drive the entropy-percentile schedule. ``epoch`` may be fractional.
    * ``generator``: source of all randomness (anchor and negative draws). The default is
      ``memory.generator``.
    * ``world_size``: used only with ``settings.release_exact`` (the release's division);
      None reads it from torch.distributed (1 when that is not initialised).

    ``stats`` values are 0-dim tensors (no host sync) except ``negatives_enqueued`` (int):
    ``loss_unweighted``, ``entropy_low`` / ``entropy_high`` (thresholds),
    ``reliable_fraction`` / ``unreliable_fraction`` (of the valid unlabeled pixels),
    ``classes_present``, ``classes_used``.
    """
    if not isinstance(settings, ContrastiveSettings):
        settings = ContrastiveSettings.from_config(settings)
    if rep_student.dim() != 4 or rep_teacher.shape != rep_student.shape:
        raise ValueError(f"rep_student {tuple(rep_student.shape)} and rep_teacher {tuple(rep_teacher.shape)} must be equal [B, D, h, w]")
    b_l, b_u = prob_labeled.shape[0], prob_unlabeled.shape[0]
    if b_l + b_u != rep_student.shape[0]:
        raise ValueError(f"rep batch {rep_student.shape[0]} != labeled {b_l} + unlabeled {b_u}")
    if prob_labeled.shape[1] != prob_unlabeled.shape[1]:
        raise ValueError(f"class counts differ: {prob_labeled.shape[1]} vs {prob_unlabeled.shape[1]}")
    if label_labeled.shape[0] != b_l or pseudo_label_unlabeled.shape[0] != b_u:
        raise ValueError("label batch sizes do not match the probability batch sizes")
    num_classes = prob_labeled.shape[1]
    if num_classes != memory.num_classes:
        raise ValueError(f"memory bank has {memory.num_classes} classes, probabilities have {num_classes}")
    gen = generator if generator is not None else memory.generator
    device = rep_student.device
    h, w = rep_student.shape[-2:]
    ignore = settings.ignore_index

    # Any autocast region the caller is in is switched off: entropy, percentiles and the
    # similarities need fp32 (bf16 entropy has about 3 significant digits, too coarse for
    # percentiles over ~1e5 pixels).
    with torch.autocast(device_type=device.type, enabled=False):
        with torch.no_grad():
            prob = torch.cat([_resize_probs(prob_labeled, (h, w)), _resize_probs(prob_unlabeled, (h, w))], dim=0)
            label = torch.cat([_resize_labels(label_labeled, (h, w)), _resize_labels(pseudo_label_unlabeled, (h, w))], dim=0).to(device)
            prob = prob.to(device)
            is_lab = torch.zeros(b_l + b_u, dtype=torch.bool, device=device)
            is_lab[:b_l] = True
            is_lab = is_lab[:, None, None].expand(-1, h, w)
            valid = label != ignore

            # Reliable / unreliable split of the unlabeled pixels, by teacher entropy.
            entropy = -(prob * torch.log(prob + 1e-10)).sum(dim=1)
            alpha, beta = entropy_percentiles_at(settings, epoch, epochs)
            valid_u = valid & ~is_lab
            low_t = masked_percentile(entropy, valid_u, alpha, empty=math.nan)
            high_t = masked_percentile(entropy, valid_u, beta, empty=math.nan)
            reliable = valid & (is_lab | (entropy.double() <= low_t))
            if settings.negative_high_entropy:
                unreliable = valid & (is_lab | (entropy.double() >= high_t))
            else:  # the release's "low" ablation: any valid unlabeled pixel may be a negative
                unreliable = valid

            # Rank of every class at every pixel (0 = teacher's top class). A stable sort
            # makes ties deterministic.
            order = torch.sort(prob, dim=1, descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(num_classes, device=device).view(1, -1, 1, 1).expand_as(order))

            low_l, low_u, high = settings.ranks_for(num_classes)
            cls = torch.arange(num_classes, device=device).view(1, -1, 1, 1)
            onehot = label[:, None] == cls  # [B, C, h, w]; False at ignored pixels
            # Anchors / prototype pixels: reliable pixels labeled c (gt or pseudo-label).
            proto_mask = onehot & reliable[:, None]
            anchor_mask = proto_mask & (prob > settings.current_class_threshold)
            # Negatives for c: pixels that are not c but could be confused with c.
            if settings.release_exact:
                # U2PL's masks: "label is c" (from the one-hot) times "label is not c" for
                # labeled pixels, which is never true; "label is c" for unlabeled ones.
                neg_l = torch.zeros_like(onehot)
                neg_u = ~is_lab[:, None] & onehot & (rank >= low_u) & (rank < high)
            else:
                neg_l = is_lab[:, None] & ~onehot & (rank < low_l)
                neg_u = ~is_lab[:, None] & ~onehot & (rank >= low_u) & (rank < high)
            neg_mask = unreliable[:, None] & (neg_l | neg_u) & (prob < settings.current_class_negative_threshold)

            # [C, N] masks over the flattened pixels (N = B*h*w), matching feats [N, D].
            def flat(m: torch.Tensor) -> torch.Tensor:
                return m.permute(1, 0, 2, 3).reshape(num_classes, -1)

            proto_mask, anchor_mask, neg_mask = flat(proto_mask), flat(anchor_mask), flat(neg_mask)
            dim = rep_student.shape[1]
            feats_t = rep_teacher.detach().float().permute(0, 2, 3, 1).reshape(-1, dim)

            # Class prototypes (positives): mean teacher feature over reliable pixels of c.
            proto_count = proto_mask.sum(dim=1)
            prototypes = (proto_mask.float() @ feats_t) / proto_count.clamp(min=1)[:, None].float()

            # Enqueue this batch's negatives. The nonzero() is the one unavoidable host sync:
            # the bank grows by a data-dependent number of rows.
            neg_cls, neg_pix = neg_mask.nonzero(as_tuple=True)  # sorted by class, then pixel
            neg_cls, neg_pix = _keep_newest_per_class(neg_cls, neg_pix, num_classes, memory.capacity)
            enqueued = memory.enqueue(feats_t.index_select(0, neg_pix), neg_cls)

        # Classes that can contribute need a non-empty bank (known on the host) and anchors
        # (known on the device; masked below without a sync).
        if settings.release_exact:
            # U2PL indexed its per-class lists by the position j among the present classes:
            # anchors and positive of class j, negatives from present class v_j's bank.
            present = (proto_count > 0).nonzero().flatten().tolist()
            pairs = [(j, v) for j, v in enumerate(present) if memory.size(v) > 0]
        else:
            pairs = [(c, c) for c in range(num_classes) if memory.size(c) > 0]
        usable = [a for a, _ in pairs]
        classes_present = (proto_count > 0).sum()
        # A zero that is still connected to rep_student, so backward() works when nothing
        # qualifies (summing first avoids an fp32 copy of the whole map).
        loss = rep_student.sum().float() * 0.0
        per_class_used = torch.zeros((), device=device)
        if usable:
            usable_t = torch.tensor(usable, device=device)
            q, k = settings.num_queries, settings.num_negatives
            with torch.no_grad():
                anchor_idx, anchor_count = _sample_masked(anchor_mask.index_select(0, usable_t), q, gen)
                negatives = torch.stack([memory.sample(v, q * k, gen) for _, v in pairs]).to(device)
                negatives = F.normalize(negatives.view(len(usable), q, k, dim), dim=-1, eps=1e-8)
                positives = F.normalize(prototypes.index_select(0, usable_t), dim=-1, eps=1e-8)
            feats_s = rep_student.permute(0, 2, 3, 1).reshape(-1, dim)
            anchors = F.normalize(feats_s[anchor_idx.reshape(-1)].float().view(len(usable), q, dim), dim=-1, eps=1e-8)
            pos_logit = torch.einsum("cqd,cd->cq", anchors, positives)
            neg_logit = torch.einsum("cqd,cqkd->cqk", anchors, negatives)
            logits = torch.cat([pos_logit[..., None], neg_logit], dim=-1) / settings.temperature
            # InfoNCE with the positive at index 0, averaged over the anchors of each class.
            per_class = (torch.logsumexp(logits, dim=-1) - logits[..., 0]).mean(dim=1)
            has_anchor = anchor_count > 0
            per_class_used = has_anchor.sum()
            total = torch.where(has_anchor, per_class, torch.zeros_like(per_class)).sum()
            enough = classes_present >= settings.min_present_classes
            scaled = total / classes_present.clamp(min=1).float()
            loss = loss + torch.where(enough, scaled, torch.zeros_like(scaled))
            per_class_used = torch.where(enough, per_class_used, torch.zeros_like(per_class_used))
        if settings.release_exact:
            loss = _release_world_division(loss, world_size)

    with torch.no_grad():
        n_valid_u = valid_u.sum().clamp(min=1).float()
        stats = {
            "loss_unweighted": loss.detach(),
            # NaN when there is no valid unlabeled pixel; report 0 so running averages survive.
            "entropy_low": torch.nan_to_num(low_t.float(), nan=0.0),
            "entropy_high": torch.nan_to_num(high_t.float(), nan=0.0),
            "reliable_fraction": (reliable & valid_u).sum().float() / n_valid_u,
            "unreliable_fraction": (unreliable & valid_u).sum().float() / n_valid_u,
            "classes_present": classes_present,
            "classes_used": per_class_used,
            "negatives_enqueued": enqueued,
        }
    return loss * settings.loss_weight, stats


def _release_world_division(loss: torch.Tensor, world_size: Optional[int]) -> torch.Tensor:
    """The release's ``all_reduce(loss); loss / world``: the value becomes the mean over the
    ranks, while the gradient is the local one divided by the world size (all_reduce is not
    differentiated), and DDP then averages that gradient once more."""
    distributed = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    local = loss / world_size
    if not distributed or dist.get_world_size() == 1:
        return local
    mean = local.detach().clone()
    dist.all_reduce(mean)
    return local + (mean - local.detach())


def _keep_newest_per_class(cls: torch.Tensor, pix: torch.Tensor, num_classes: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop rows a queue of ``capacity`` would evict immediately anyway.

    ``cls`` is sorted. Trimming before the gather keeps DDP traffic and the packed tensor at
    most ``capacity`` rows per class and rank, instead of every negative pixel (~10^5 per
    batch on VOC).
    """
    if cls.numel() <= capacity:
        return cls, pix
    counts = torch.bincount(cls, minlength=num_classes)
    starts = counts.cumsum(0) - counts
    pos_in_class = torch.arange(cls.numel(), device=cls.device) - starts[cls]
    keep = pos_in_class >= (counts[cls] - capacity)
    return cls[keep], pix[keep]
