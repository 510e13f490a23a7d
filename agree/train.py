"""Fine-tune a CLIP dual encoder with the AGREE losses.

python -m agree.train +experiment=demo [key=value ...]
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from agree.atomic import write_json, write_torch
from agree.callbacks import configured_callbacks
from agree.cli import freeze_imports, user_errors
from agree.config import allow_tf32, data_source, restores_torch_flags
from agree.console import quiet_libraries
from agree.data.datamodule import AgreeDataModule
from agree.errors import ConfigError
from agree.loggers import WANDB_RUN_FILE, build_logger
from agree.model.module import AgreeModule
from agree.model.registry import inputs_for
from agree.model.tokenizer import get_tokenizer
from agree.runfolder import RECORD, HydraRun, data_roots, output_folders
from agree.settings import TrainSettings, train_settings
from agree.workers import die_with_parent

LAST = Path("checkpoints") / "last.ckpt"  # in the run's output_dir
# what a run writes into its output_dir: make clean may delete them in the demo's (agree.folders)
CONTENTS = (
    *("checkpoints/*", "csv/*", "tensorboard/*", "wandb/*", "metrics.json", WANDB_RUN_FILE),
    *(f"{RECORD}/*", "*.log"),  # the record and log of a run of agree.train itself
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through a temporary file beside the target and renamed into place.

    Lightning's own ``_atomic_save`` stages a local file in the system temp folder (fsspec
    transaction) and ``shutil.move``s it: a copy into the target, not a rename, whenever that
    folder is on another filesystem, and a leftover temp file when the process is killed.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        write_torch(path, checkpoint)


class LastCheckpoint(Callback):
    """``path`` (``checkpoints/last.ckpt``) at every epoch end, every ``every_n_train_steps`` steps
    when set, and when training ends: one file replaced in place, never a versioned duplicate.

    The loggers are flushed first, so that the files on disk match the checkpoint; the checkpoint
    records the validation metrics and whether training was finished (see ``run_state``).
    """

    def __init__(self, path: Path, every_n_train_steps: int | None = None):
        self.path, self.every = path, every_n_train_steps
        self.saved_step, self.trainer = None, None

    def _save(self, trainer: L.Trainer) -> None:
        if self.saved_step == trainer.global_step:
            return
        for logger in trainer.loggers:
            logger.save()
        self.trainer = trainer
        trainer.save_checkpoint(self.path)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # an epoch without validation (else saved after it, at this step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None:
            return {}
        return {
            "metrics": validation_metrics(trainer.callback_metrics),
            "finished": trainer.global_step >= trainer.estimated_stepping_batches,
        }


def validation_metrics(metrics: dict) -> dict[str, float]:
    """The ``val/*`` entries of Lightning's callback metrics, as floats."""
    return {k: float(v) for k, v in metrics.items() if k.startswith("val/")}


def run_state(checkpoint: str | None) -> dict:
    """What ``LastCheckpoint`` recorded in ``checkpoint``, and its ``global_step`` (empty for a fresh
    run; only the step for a checkpoint of another program)."""
    if checkpoint is None:
        return {}
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    recorded = state.get("callbacks", {}).get(LastCheckpoint.__qualname__, {})
    return {**recorded, "global_step": int(state.get("global_step", 0))}


def check_new_run(out: Path, resume: str | None) -> None:
    """A run starts in a folder holding another run only to resume that run's own last checkpoint."""
    held = [path for path in (out / LAST, out / "metrics.json") if path.exists()]
    if held and not (resume is not None and os.path.realpath(resume) == os.path.realpath(out / LAST)):
        raise ConfigError(
            f"{out} holds a run ({held[0].relative_to(out)}): resume it with ckpt_path=last, "
            "or start afresh in a new folder (another hydra.run.dir, or output_dir)"
        )


def finished_run(out: Path, state: dict) -> dict[str, float]:
    """The metrics of a run resumed after it finished; nothing is trained or rewritten.

    A run killed between its final checkpoint and ``metrics.json`` gets that file from the
    checkpoint; a complete run stops with one line.
    """
    metrics_file = out / "metrics.json"
    if metrics_file.is_file():
        raise ConfigError(
            f"ckpt_path=last: the run in {out} is finished (its metrics are in {metrics_file}); "
            "nothing to resume: to train longer, start a new run with model.pretrained=<its last.ckpt>"
        )
    write_json(metrics_file, state["metrics"])
    return state["metrics"]


@restores_torch_flags
def train(cfg: DictConfig, run: HydraRun | None = None) -> tuple[dict[str, float], dict]:
    """Train as ``cfg`` says; return the final validation metrics and the objects used.

    ``run``: the ``@hydra.main`` run, whose folder is checked, locked and claimed too, and whose
    record (``.hydra/``) is written once every check has passed (``agree.runfolder``).

    Global torch flags it sets are restored when it returns (``config.torch_flags``).
    """
    settings = train_settings(cfg)  # every check, before anything is built or written
    out = settings.output_dir
    folders = {"output_dir": out} if run is None else {"hydra.run.dir": run.folder, "output_dir": out}
    with output_folders("train", folders, data_roots(settings.cfg), run):
        check_new_run(out, settings.resume)
        state = run_state(settings.resume)
        if state.get("finished"):
            return finished_run(out, state), {}
        return fit(cfg, settings, state, run)


def fit(
    cfg: DictConfig, settings: TrainSettings, state: dict, run: HydraRun | None = None
) -> tuple[dict[str, float], dict]:
    """Build the module, data and Trainer of checked ``settings`` and train, resuming ``state``;
    ``run``'s record is written once they are built (Lightning checks the Trainer's arguments)."""
    c, out = settings.cfg, settings.output_dir
    allow_tf32(c.tf32)
    L.seed_everything(c.seed, workers=True)
    module = AgreeModule(
        model_name=settings.model.name,
        pretrained=settings.model.pretrained,
        loss_weights=settings.weights,
        margin=c.loss_options.margin,
        skip_duplicate_negatives=c.loss_options.skip_duplicate_negatives,
        lr=c.optim.lr,
        weight_decay=c.optim.weight_decay,
        betas=tuple(c.optim.betas),
        eps=c.optim.eps,
        warmup_steps=c.optim.warmup_steps,
        margin_gradient=c.loss_options.margin_gradient,
        exempt_1d=c.optim.exempt_1d,
        schedule_epochs=c.optim.schedule_epochs,
        grad_checkpointing=c.model.grad_checkpointing,
        compile=c.model.compile,
        fused_adamw=c.optim.fused,
        data_source=data_source(c.data),
        ddp_gradient=c.loss_options.ddp_gradient,
        max_logit_scale=c.optim.max_logit_scale,
        margin_reduction=c.loss_options.margin_reduction,
    )
    trainer_args = settings.trainer
    logger = build_logger(cfg, resume_step=state.get("global_step", 0))
    checkpoints = LastCheckpoint(out / LAST, c.checkpoint.every_n_train_steps)
    callbacks = [
        checkpoints,
        *configured_callbacks(cfg.get("callbacks"), logger, trainer_args["enable_progress_bar"]),
    ]
    trainer = L.Trainer(
        **trainer_args,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=out,
        plugins=[AtomicCheckpointIO()],
    )
    datamodule = AgreeDataModule(
        settings.layout,
        get_tokenizer(settings.model.name, c.text.eot_on_truncation),
        batch_size=settings.device_batch_size(trainer.world_size, trainer.accumulate_grad_batches),
        val_batch_size=c.data.val_batch_size,
        num_workers=c.data.num_workers,
        needs=inputs_for(settings.weights),
        max_entities=c.data.max_entities,
        max_entity_words=c.data.max_entity_words,
        synthetic=settings.scenes,
        seed=c.seed,
        fallback_mask=c.data.fallback_mask,
        mask_ignore_case=c.text.mask_ignore_case,
        encode_empty_slots=c.text.encode_empty_slots,
    )
    if run is not None:
        run.write_record()
    trainer.fit(module, datamodule=datamodule, ckpt_path=settings.resume, weights_only=True)
    metrics = validation_metrics(trainer.callback_metrics)
    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    freeze_imports()
    quiet_libraries()
    run = HydraRun.of(cfg)  # before train() fills in the model's defaults: the record is the command's
    die_with_parent()  # loader workers end with the command, however it ends
    try:
        with user_errors():
            metrics, _ = train(cfg, run)
    finally:
        if cfg.get("logger") and str(cfg.logger.get("_target_", "")).endswith("WandbLogger"):
            import wandb

            wandb.finish()  # a multirun's next job must not reuse this run
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
