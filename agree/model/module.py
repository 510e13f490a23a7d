"""AgreeModule: Lightning glue around an open_clip model and the pure loss functions."""

from __future__ import annotations

import math

import lightning as L
import torch

from agree.model import losses
from agree.model.clip import CHECKPOINT_KEY, create_clip, encode_image, encode_text
from agree.retrieval.metrics import RetrievalRecallMetric

MAX_LOGIT_SCALE = math.log(100.0)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the reference: decay on weight matrices only, none on gains, biases, logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class AgreeModule(L.LightningModule):
    """Fine-tunes a CLIP dual encoder with the weighted AGREE losses (weight 0 = off)."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        loss_weights: dict[str, float],
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_clip(model_name, pretrained)
        self.loss_weights = {name: w for name, w in loss_weights.items() if w > 0}
        self.val_recall = RetrievalRecallMetric()

    # -- training -------------------------------------------------------------------------------

    def _gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Features of every rank (with gradients to the local part) and this rank's offset."""
        if self.trainer.world_size == 1:
            return x, 0
        gathered = self.all_gather(x, sync_grads=True)
        return gathered.flatten(0, 1), self.global_rank * x.shape[0]

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each enabled loss, unweighted."""
        scale = self.model.logit_scale.exp()
        image = encode_image(self.model, batch["images"])
        text = encode_text(self.model, batch["captions"])
        image_all, offset = self._gather(image)
        text_all, _ = self._gather(text)
        return {"clip": losses.contrastive_loss(image, text, scale, image_all, text_all, offset)}

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
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # -- validation -----------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_recall.update(
            encode_image(self.model, batch["images"]),
            batch["image_ids"],
            encode_text(self.model, batch["captions"]),
            batch["text_ids"],
            batch["text_image_ids"],
        )

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_recall.compute()
        self.val_recall.reset()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=False, sync_dist=False)

    # -- optimisation and checkpoints -------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps
        )
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.hparams.model_name
