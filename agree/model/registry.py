"""The fine-tuning losses (AGREE's six and the swap negatives), one entry each: name -> batch
inputs -> release files -> how it is computed.

Every other place that knows the losses reads this table: training (``inputs_for``: what the
datasets load), the config checks (``loss_weights``, ``loss_files``), ``module.agree_losses``
(which features to encode, and each loss's value), the study and the ablation sweep (a test holds
``conf/experiment/ablation.yaml``'s list equal to ``PAPER_LOSSES``). It imports only torch, the pure
loss functions and the slot scatter: no Lightning or open_clip code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives

from agree.data.entities import scatter_slots
from agree.errors import ConfigError
from agree.model import losses

MARGIN_REDUCTIONS = ("sum", "mean")  # loss_options.margin_reduction: the release's sum, or the mean
# The files an entity input is read from: (its path in a ``ReleaseLayout``, the key of its folder).
INPUT_FILES: dict[str, tuple[tuple[Callable[[Any], Path], str], ...]] = {
    "ground_masked": ((lambda layout: layout.grounding_npz, "data.root"),),
    "vg": (
        (lambda layout: layout.vg_images_npz, "data.vg_root"),
        (lambda layout: layout.vg_vocab, "data.vg_root"),
        (lambda layout: layout.image_objects("train"), "data.root"),
    ),
    "vg_masked": ((lambda layout: layout.vg_mask_images_npz, "data.vg_root"),),
}
# Feature name -> batch key, in the order they are concatenated for one encoder call.
IMAGE_PARTS = {
    "image": "images",
    "vg": "vg_images",
    "vg_masked": "vg_masked_images",
    "ground_masked": "ground_masked_images",
}
TEXT_PARTS = {
    "caption": "captions",
    "vg_prompt": "vg_prompts",
    "prompt": "prompts",
    "masked": "masked_captions",
    "swap": "swap_captions",
}


# torch's all_gather that differentiates (its backward sums each rank's gradient into the local rows);
# torch.distributed.nn.functional.all_gather (open_clip's) is deprecated (a FutureWarning in torch 2.14)
_all_gather = (
    getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
)


def gather_rows(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """(rows of every rank concatenated, this rank's offset); gradients reach the local rows.

    Equal row counts on every rank are assumed (the train loader drops the last batch). Every rank
    calls it for the same tensors whatever its data, and the losses keep every gathered tensor in
    their graph, so every rank also runs the same collectives backward.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    gathered = _all_gather(x if with_grad else x.detach(), 0, dist.group.WORLD)
    return gathered, dist.get_rank() * x.shape[0]


def no_gather(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """The rows as they are (a batch that already holds every rank's rows)."""
    return x, 0


# The gradient of a multi-process step (``loss_options.ddp_gradient``).
DDP_GRADIENTS = ("global", "per_rank_mean")
# The batch entries the losses read besides the features: one row per pair, gathered as they are.
_BATCH_ROWS = ("image_keys", "caption_keys", "entity_valid", "entity_keys", "vg_keys")


def release_global_batch(f: dict[str, torch.Tensor], batch: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Every rank's features and ids, as the release's multi-process step sees them.

    The release gathers the features without gradient and puts this rank's own back (only they
    carry a gradient); every rank then computes the loss of the whole global batch, and DDP
    averages the gradients: each rank's rows get 1/W of the global loss's gradient, the logit
    scale all of it. Entity parts (the valid slots' rows, a different count per rank) are laid
    out as [B, slots, D] to be gathered, and their valid rows taken again.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return f, batch
    rank = dist.get_rank()

    def gathered(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x
        return torch.cat(parts)

    rows = {key: gathered(batch[key]) for key in _BATCH_ROWS if key in batch}
    out = {}
    for part, features in f.items():
        if part in ("prompt", "masked"):
            out[part] = gathered(scatter_slots(features, batch["entity_valid"]))[rows["entity_valid"]]
        else:
            out[part] = gathered(features)
    return out, {**batch, **rows}


@dataclass
class LossBatch:
    """What the losses of one training step share: the encoded features (``f``, by part name),
    the batch, the logit scale, the gathered images and captions and the loss options."""

    f: dict[str, torch.Tensor]
    batch: dict
    scale: torch.Tensor
    margin: float
    skip_duplicate_negatives: bool
    margin_gradient: bool
    margin_reduction: str = "sum"  # or "mean": over the pairs that count in the global batch
    gather: Callable[..., tuple[torch.Tensor, int]] = gather_rows  # no_gather: f holds every rank's rows

    def __post_init__(self) -> None:
        self.image_all, self.offset = self.gather(self.f["image"])
        self.caption_all, _ = self.gather(self.f["caption"])
        self.global_n = len(self.image_all)

    def keys(self, *ids: torch.Tensor) -> torch.Tensor | None:
        """Gathered ids whose matches are left out of the negatives (None: keep every negative)."""
        if not self.skip_duplicate_negatives:
            return None
        return self.gather(torch.stack(ids, -1), with_grad=False)[0]

    @cached_property
    def pair_keys(self) -> torch.Tensor | None:
        """The gathered (image, caption) ids of the image-caption pairs (see ``keys``)."""
        return self.keys(self.batch["image_keys"], self.batch["caption_keys"])

    @cached_property
    def valid_all(self) -> torch.Tensor:
        """[global B, slots] bool: the used entity slots of every rank."""
        return self.gather(self.batch["entity_valid"], with_grad=False)[0]

    @cached_property
    def positive(self) -> torch.Tensor:
        """[B] s(v, t) of each image and its caption."""
        return (self.f["image"] * self.f["caption"]).sum(-1)

    def slots(self, part: str) -> torch.Tensor:
        """[B, slots, D] the features of ``part``'s real entity slots scattered into place, 0 elsewhere."""
        return scatter_slots(self.f[part], self.batch["entity_valid"])

    def margin_loss(self, positive, negative, valid=None) -> torch.Tensor:
        """A margin loss over the rows (``valid``: the slots that count), reduced by ``margin_reduction``."""
        pairs = None
        if self.margin_reduction == "mean":
            pairs = self.global_n if valid is None else self.valid_all.sum()
        return losses.margin_ranking_loss(
            positive, negative, self.scale, self.margin, valid, self.global_n, self.margin_gradient, pairs
        )


def _clip(b: LossBatch) -> torch.Tensor:
    return losses.contrastive_loss(
        b.f["image"], b.f["caption"], b.scale, b.image_all, b.caption_all, b.offset, None, b.pair_keys
    )


def _prompt(b: LossBatch) -> torch.Tensor:
    slots = b.slots("prompt")
    valid = b.batch["entity_valid"]
    slots_all, _ = b.gather(slots)
    slot_keys = b.keys(b.batch["image_keys"][:, None].expand_as(valid), b.batch["entity_keys"])
    return losses.slot_contrastive_loss(
        b.f["image"], slots, b.scale, b.valid_all, b.image_all, slots_all, b.offset, slot_keys
    )


def _text_mask(b: LossBatch) -> torch.Tensor:
    negative = (b.f["image"][:, None] * b.slots("masked")).sum(-1)
    return b.margin_loss(b.positive, negative, b.batch["entity_valid"])


def _vg_contrast(b: LossBatch) -> torch.Tensor:
    vg_all, _ = b.gather(b.f["vg"])
    vg_prompt_all, _ = b.gather(b.f["vg_prompt"])
    return losses.contrastive_loss(
        b.f["vg"],
        b.f["vg_prompt"],
        b.scale,
        vg_all,
        vg_prompt_all,
        b.offset,
        None,
        b.keys(b.batch["vg_keys"]),
    )


def _vg_mask(b: LossBatch) -> torch.Tensor:
    positive = (b.f["vg"] * b.f["vg_prompt"]).sum(-1)
    return b.margin_loss(positive, (b.f["vg_masked"] * b.f["vg_prompt"]).sum(-1))


def _ground_mask(b: LossBatch) -> torch.Tensor:
    return b.margin_loss(b.positive, (b.f["ground_masked"] * b.f["caption"]).sum(-1))


def _swap_negatives(b: LossBatch) -> torch.Tensor:
    has_swap = b.batch["swap_valid"]
    swap = scatter_slots(b.f["swap"], has_swap[:, None])[:, 0]  # each image's own swap, 0 without one
    # a swap is a negative of its own image only, which is local: the features stay on their rank,
    # the mask is gathered for the global count
    has_swap_all, _ = gather_rows(has_swap, with_grad=False)
    return losses.swap_negatives_loss(
        b.f["image"], b.caption_all, swap, has_swap, b.scale, b.offset, has_swap_all, b.pair_keys
    )


@dataclass(frozen=True)
class Loss:
    """One fine-tuning loss: the entity inputs its batches carry beyond images and captions (the
    dataset loads them, and their files must exist), the feature parts it needs encoded
    (``IMAGE_PARTS``/``TEXT_PARTS``), its unweighted value for one batch, and whether it is one of
    the paper's (``losses=agree`` turns those on; the ablation drops them one at a time)."""

    inputs: frozenset[str]
    parts: frozenset[str]
    compute: Callable[[LossBatch], torch.Tensor]
    paper: bool = True


# In this order the losses are computed and summed (SPEC §1).
LOSSES: dict[str, Loss] = {
    "clip": Loss(frozenset(), frozenset(), _clip),
    "prompt": Loss(frozenset({"prompts"}), frozenset({"prompt"}), _prompt),
    "text_mask": Loss(frozenset({"masked_captions"}), frozenset({"masked"}), _text_mask),
    "vg_contrast": Loss(frozenset({"vg"}), frozenset({"vg", "vg_prompt"}), _vg_contrast),
    "vg_mask": Loss(frozenset({"vg", "vg_masked"}), frozenset({"vg", "vg_prompt", "vg_masked"}), _vg_mask),
    "ground_mask": Loss(frozenset({"ground_masked"}), frozenset({"ground_masked"}), _ground_mask),
    # beyond the paper: NegCLIP's swapped captions as hard negatives (agree.data.swaps)
    "swap_negatives": Loss(frozenset({"swaps"}), frozenset({"swap"}), _swap_negatives, paper=False),
}
PAPER_LOSSES = tuple(name for name, loss in LOSSES.items() if loss.paper)


def inputs_for(loss_weights: Mapping[str, float]) -> frozenset[str]:
    """The entity inputs the enabled losses (weight > 0; names checked by ``loss_weights``) need."""
    return frozenset().union(*(LOSSES[name].inputs for name, w in loss_weights.items() if w > 0))


def loss_files(layout, name: str) -> list[tuple[Path, str]]:
    """The release files loss ``name`` reads (``layout``: a ``ReleaseLayout``), each with the key
    of its folder."""
    return [
        (path(layout), key) for need in sorted(LOSSES[name].inputs) for path, key in INPUT_FILES.get(need, ())
    ]


def loss_weights(weights: Mapping[str, object], drop_loss: str | None = None) -> dict[str, float]:
    """The ``losses`` weights checked (known losses, numbers >= 0, one > 0), ``drop_loss`` set to 0."""
    checked = {}
    for name, weight in weights.items():
        if name not in LOSSES:
            raise ConfigError(f"losses.{name} is not a loss; the losses are {sorted(LOSSES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(
                f"losses.{name}={weight}: a loss weight is a number >= 0 (0 turns the loss off)"
            )
        checked[name] = float(weight)
    if drop_loss not in (None, "none"):
        if drop_loss not in checked:
            raise ConfigError(f"drop_loss={drop_loss!r} is not a loss; choose one of {sorted(checked)}")
        checked[drop_loss] = 0.0
    if not any(checked.values()):
        raise ConfigError(
            "every losses.* weight is 0: nothing to train; set losses.clip=1 (or choose losses=agree)"
        )
    return checked
