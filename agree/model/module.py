"""AgreeModule: Lightning glue around an open_clip model and the pure loss functions."""

from __future__ import annotations

import math

import lightning as L
import torch

from agree.model.clip import CHECKPOINT_KEY, DATA_KEY, create_clip, encode_image, encode_text
from agree.model.registry import IMAGE_PARTS, LOSSES, TEXT_PARTS, LossBatch, no_gather, release_global_batch
from agree.retrieval.recall_metric import RetrievalRecallMetric

MAX_LOGIT_SCALE = math.log(100.0)


def parameter_groups(model: torch.nn.Module, weight_decay: float, exempt_1d: bool = True) -> list[dict]:
    """AdamW groups: no decay on parameters named ``bn``, ``ln``, ``bias`` or ``logit_scale``.

    ``exempt_1d`` also exempts every other parameter with fewer than 2 dimensions (gains and
    embeddings such as ``class_embedding``); the release decays those.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        by_name = "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        exempt = by_name or (exempt_1d and param.ndim < 2)
        (no_decay if exempt else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def speed_options(model: torch.nn.Module, grad_checkpointing: bool, compile: bool) -> None:
    """Activation checkpointing (open_clip's own) and ``torch.compile`` of both towers, in place."""
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if compile:
        compile_towers(model)


def compile_towers(model: torch.nn.Module, **options) -> None:
    """``torch.compile`` (``options``: its arguments) of the image tower and the text transformer,
    each with dynamic shapes from the start.

    The text transformer gets another batch size and length with every length group
    (``clip.encode_text``), the image tower another batch size in validation and in a last batch:
    compiled for one shape, each would be compiled again as they come. Per tower, one graph per
    grad mode (training, validation), and one more for a batch of one image (torch specialises
    size 1). ``nn.Module.compile`` keeps the state-dict keys (``torch.compile(module)`` would prefix
    them), so checkpoints stay loadable by an uncompiled model.
    """
    model.visual.compile(dynamic=True, **options)
    model.transformer.compile(dynamic=True, **options)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule_steps(trainer: L.Trainer, schedule_epochs: int | None) -> int:
    """Optimiser steps of the cosine schedule: the whole run, or ``schedule_epochs`` epochs of it
    (the release decays over 50 epochs and keeps the checkpoint of epoch 2)."""
    total = trainer.estimated_stepping_batches  # also sets up the train loader
    if schedule_epochs is None:
        return int(total)
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    return int(schedule_epochs * per_epoch)


def _encode_parts(encode, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encode every tensor in ``parts`` in one call and split the features back by name."""
    sizes = [len(t) for t in parts.values()]
    features = encode(torch.cat(list(parts.values()))).split(sizes)
    return dict(zip(parts, features, strict=True))


def agree_losses(
    model: torch.nn.Module,
    batch: dict,
    weights: dict[str, float],
    margin: float = 0.0,
    skip_duplicate_negatives: bool = True,
    margin_gradient: bool = True,
    ddp_gradient: str = "global",
    margin_reduction: str = "sum",
) -> dict[str, torch.Tensor]:
    """Each enabled loss (weight > 0), unweighted, for one batch of ``CollateTrain``.

    ``margin_gradient=False`` reproduces the release's margin losses, which train nothing;
    ``margin_reduction``: ``sum`` (the release) or ``mean`` of the margin losses over their pairs.
    ``ddp_gradient`` (several processes): ``global``, each rank's losses over its own rows, so
    that DDP's mean of the gradients is the gradient of the global batch's loss; ``per_rank_mean``,
    the release's: every rank computes the global batch's loss (``release_global_batch``).

    All image variants go through the image tower in one call and all text variants
    (captions, entity prompts, masked captions, VG prompts) through the text tower in one call,
    cut to the lengths the collate measured on the host (``text_lengths``): no value is read back
    from the device in the whole forward.
    """
    on = [name for name in LOSSES if weights.get(name, 0) > 0]
    parts = set().union(*(LOSSES[name].parts for name in on))
    images = {part: batch[key] for part, key in IMAGE_PARTS.items() if part == "image" or part in parts}
    text_keys = {part: key for part, key in TEXT_PARTS.items() if part == "caption" or part in parts}
    texts = {part: batch[key] for part, key in text_keys.items()}
    host = batch.get("text_lengths")
    lengths = None if host is None else [n for key in text_keys.values() for n in host[key]]
    f = {
        **_encode_parts(lambda x: encode_image(model, x), images),
        **_encode_parts(lambda x: encode_text(model, x, lengths), texts),
    }
    options = (model.logit_scale.exp(), margin, skip_duplicate_negatives, margin_gradient, margin_reduction)
    if ddp_gradient == "per_rank_mean":
        shared = LossBatch(*release_global_batch(f, batch), *options, gather=no_gather)
    else:
        shared = LossBatch(f, batch, *options)
    return {name: LOSSES[name].compute(shared) for name in on}


class AgreeModule(L.LightningModule):
    """Fine-tunes a CLIP dual encoder with the weighted AGREE losses (weight 0 = off)."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        loss_weights: dict[str, float],
        margin: float = 0.0,
        skip_duplicate_negatives: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        margin_gradient: bool = True,
        exempt_1d: bool = True,
        schedule_epochs: int | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        fused_adamw: bool | None = None,
        data_source: dict | None = None,
        ddp_gradient: str = "global",
        max_logit_scale: float = MAX_LOGIT_SCALE,
        margin_reduction: str = "sum",
    ):
        """``data_source``: what the checkpoints record of the training data (``DATA_KEY``)."""
        super().__init__()
        self.save_hyperparameters()
        self.model = create_clip(model_name, pretrained)
        speed_options(self.model, grad_checkpointing, compile)
        self.loss_weights = {name: w for name, w in loss_weights.items() if w > 0}
        self.val_recall = RetrievalRecallMetric()

    # -- training -------------------------------------------------------------------------------

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each enabled loss, unweighted."""
        hp = self.hparams
        return agree_losses(
            self.model,
            batch,
            self.loss_weights,
            hp.margin,
            hp.skip_duplicate_negatives,
            hp.margin_gradient,
            hp.ddp_gradient,
            hp.margin_reduction,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts = self.compute_losses(batch)
        total = sum(self.loss_weights[name] * value for name, value in parts.items())
        batch_size = batch["images"].shape[0]
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in parts.items()}, batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", self.model.logit_scale.exp().detach(), batch_size=batch_size)
        return total

    def on_train_batch_end(self, *args) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.hparams.max_logit_scale)

    # -- validation -----------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_recall.update(
            encode_image(self.model, batch["images"]),
            batch["image_ids"],
            encode_text(self.model, batch["captions"], batch["text_lengths"]["captions"]),
            batch["text_ids"],
            batch["text_image_ids"],
        )

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_recall.compute()
        self.val_recall.reset()
        # the metric already gathered every rank's features: the values agree on all ranks
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)

    # -- optimisation and checkpoints -------------------------------------------------------------

    def optimizer(self) -> torch.optim.AdamW:
        """AdamW as configured; ``fused_adamw`` None: the fused kernel (one launch per step) on CUDA."""
        hp = self.hparams
        fused = hp.get("fused_adamw")
        return torch.optim.AdamW(
            parameter_groups(self.model, hp.weight_decay, hp.exempt_1d),
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
            fused=self.device.type == "cuda" if fused is None else fused,
        )

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = self.optimizer()
        total = schedule_steps(self.trainer, hp.schedule_epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.hparams.model_name
        if self.hparams.get("data_source") is not None:
            checkpoint[DATA_KEY] = dict(self.hparams.data_source)
