"""Lightning callbacks: the ``callbacks`` config group's, and retrieval examples as a W&B table."""

from __future__ import annotations

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig

from agree.data.datasets import Tokenizer, ValImages
from agree.data.pixels import thumbnail
from agree.model.clip import encode_image, encode_text


def configured_callbacks(
    group: DictConfig | None, logger: Logger | bool, progress_bar: bool
) -> list[Callback]:
    """The ``callbacks`` group's callbacks, each built from its ``_target_``, and W&B's examples table.

    A learning-rate monitor without a logger, or a progress bar with the bar off, would make
    Lightning refuse to start: each is left out then.
    """
    built = [hydra.utils.instantiate(spec) for spec in (group or {}).values() if spec is not None]
    callbacks = [
        c
        for c in built
        if not (isinstance(c, LearningRateMonitor) and not logger)
        and not (isinstance(c, ProgressBar) and not progress_bar)
    ]
    if isinstance(logger, WandbLogger):
        callbacks.append(RetrievalExamples())
    return callbacks


def example_columns(k: int) -> list[str]:
    """The table's columns: the query, its ground truth's rank, k images and k ground-truth flags."""
    return [
        "query",
        "ground_truth_rank",
        *(f"top_{r}" for r in range(1, k + 1)),
        *(f"top_{r}_is_ground_truth" for r in range(1, k + 1)),
    ]


@torch.no_grad()
def example_rows(
    model: torch.nn.Module,
    val_set: ValImages,
    tokenizer: Tokenizer,
    queries: int = 4,
    gallery: int = 64,
    k: int = 5,
    size: int = 64,
    normalisation: dict | None = None,
) -> list[list]:
    """Rows of ``example_columns``: the first caption of ``queries`` evenly spaced images of the
    first ``gallery`` validation images, searched among those images (thumbnails ``size`` px)."""
    import wandb

    device = next(model.parameters()).device
    items = [val_set[i] for i in range(min(gallery, len(val_set)))]
    picks = torch.linspace(0, len(items) - 1, min(queries, len(items))).round().long().tolist()
    images = torch.stack([item["image"] for item in items]).to(device)
    captions = [items[i]["captions"][0] for i in picks]
    scores = encode_text(model, tokenizer(captions).to(device)) @ encode_image(model, images).T
    order = scores.float().argsort(dim=1, descending=True, stable=True).cpu().tolist()
    rows = []
    for caption, truth, ranked in zip(captions, picks, order, strict=True):
        top = ranked[:k]
        shown = [
            wandb.Image(
                thumbnail(items[i]["image"].numpy(), size, **(normalisation or {})),
                caption="ground truth" if i == truth else "",
            )
            for i in top
        ]
        rows.append([caption, ranked.index(truth) + 1, *shown, *(i == truth for i in top)])
    return rows


class RetrievalExamples(Callback):
    """After each validation, logs a W&B table of caption queries with their top-k validation images."""

    def __init__(
        self, queries: int = 4, gallery: int = 64, k: int = 5, size: int = 64, key: str = "val/examples"
    ):
        self.queries, self.gallery, self.k, self.size, self.key = queries, gallery, k, size, key

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if trainer.sanity_checking or not trainer.is_global_zero or not loggers:
            return
        datamodule = trainer.datamodule
        rows = example_rows(
            pl_module.model,
            datamodule.val_set,
            datamodule.tokenizer,
            self.queries,
            self.gallery,
            self.k,
            self.size,
            {"mean": datamodule.layout.mean, "std": datamodule.layout.std},
        )
        loggers[0].log_table(self.key, example_columns(self.k), rows, step=trainer.global_step)
