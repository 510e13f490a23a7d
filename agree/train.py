"""Fine-tune a CLIP dual encoder with the AGREE losses.

python -m agree.train +experiment=demo [key=value ...]
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from agree.callbacks import logging_callbacks
from agree.checks import ConfigError, check_loss_weights, check_train_config, resume_path
from agree.config import allow_tf32, data_layout, resolve_precision, scene_config
from agree.data.datamodule import AgreeDataModule
from agree.data.datasets import inputs_for
from agree.io import write_json, write_torch
from agree.model.clip import get_tokenizer
from agree.model.module import AgreeModule
from agree.progress import interactive


def build_logger(cfg: DictConfig):
    """The configured Lightning logger; W&B runs offline when no API key is configured."""
    if cfg.get("logger") is None:
        return False
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    if logger_cfg["_target_"].endswith("WandbLogger"):
        import wandb

        if logger_cfg.get("offline") is None:
            logger_cfg["offline"] = not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key)
        logger = hydra.utils.instantiate(logger_cfg)
        logger.experiment.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)
        return logger
    return hydra.utils.instantiate(logger_cfg)


def loss_weights(cfg: DictConfig) -> dict[str, float]:
    """The ``losses`` weights, with ``drop_loss`` (an ablation) set to 0."""
    return check_loss_weights(cfg)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through a temporary file beside the target and renamed into place.

    Lightning's own ``_atomic_save`` stages a local file in the system temp folder (fsspec
    transaction) and ``shutil.move``s it: a copy into the target, not a rename, whenever that
    folder is on another filesystem, and a leftover temp file when the process is killed.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        write_torch(path, checkpoint)


class FinalCheckpoint(Callback):
    """Writes ``path`` when training ends unless the final step was just checkpointed
    (``ModelCheckpoint(every_n_train_steps=N)`` alone misses the steps after the last multiple of N)."""

    def __init__(self, path: Path):
        self.path, self.saved_step = path, None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = checkpoint["global_step"]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    """Train as ``cfg`` says; return the final validation metrics and the objects used."""
    check_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    allow_tf32(cfg.get("tf32", True))
    out = Path(cfg.output_dir)
    weights = loss_weights(cfg)
    module = AgreeModule(
        model_name=cfg.model.name,
        pretrained=cfg.model.pretrained,
        loss_weights=weights,
        margin=cfg.loss_options.margin,
        skip_duplicate_negatives=cfg.loss_options.skip_duplicate_negatives,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        warmup_steps=cfg.optim.warmup_steps,
        grad_checkpointing=cfg.model.get("grad_checkpointing", False),
        compile=cfg.model.get("compile", False),
        fused_adamw=cfg.optim.get("fused"),
    )
    datamodule = AgreeDataModule(
        data_layout(cfg.data),
        get_tokenizer(cfg.model.name),
        batch_size=cfg.data.batch_size,
        val_batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        needs=inputs_for(weights),
        max_entities=cfg.data.max_entities,
        max_entity_words=cfg.data.max_entity_words,
        synthetic=scene_config(cfg.data),
        seed=cfg.seed,
    )
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
    )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision"))
    if trainer_cfg.get("enable_progress_bar") is None:
        trainer_cfg["enable_progress_bar"] = interactive()
    logger = build_logger(cfg)
    callbacks = [checkpoints, FinalCheckpoint(out / "checkpoints" / "last.ckpt"), *logging_callbacks(logger)]
    trainer = L.Trainer(
        **trainer_cfg,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=out,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    finally:
        if cfg.get("logger") and str(cfg.logger.get("_target_", "")).endswith("WandbLogger"):
            import wandb

            wandb.finish()  # a multirun's next job must not reuse this run
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
