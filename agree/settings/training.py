"""The settings of ``agree.train``: loss weights, layout, resume path, Trainer arguments, checked."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from agree.config import data_layout, resolve_model, scene_config
from agree.data.datasets import FALLBACK_MASKS
from agree.data.json_lines import first_row, nonblank_lines
from agree.data.layout import ReleaseLayout
from agree.data.records import PREPARED_FIELDS, how_to_prepare, prepared_fields
from agree.data.synthetic import SceneConfig
from agree.errors import ConfigError
from agree.model.registry import DDP_GRADIENTS, LOSSES, MARGIN_REDUCTIONS, loss_files, loss_weights
from agree.schema import TrainConfig, TrainerConfig
from agree.settings.common import (
    ModelSettings,
    at_least,
    check_checkpoint,
    check_data_group,
    check_data_root,
    check_data_values,
    check_model,
    check_npz_images,
    check_seed,
    model_settings,
    require,
    require_file,
    typed,
)


def resume_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, where ``last`` is the run's own last checkpoint."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return str(check_checkpoint(ckpt_path))
    path = Path(output_dir) / "checkpoints" / "last.ckpt"
    require_file(
        path,
        "ckpt_path",
        "last",
        "drop ckpt_path to start afresh, or set hydra.run.dir to the interrupted run's directory",
    )
    return str(path)


def device_batch_size(data: DictConfig, world_size: int, accumulate: int = 1) -> int:
    """Pairs per process and step: ``data.batch_size``, or ``data.global_batch_size`` split over
    the processes (``trainer.devices × trainer.num_nodes``) and the accumulated batches."""
    total = data.get("global_batch_size")
    if total is None:
        return int(data.batch_size)
    parts = world_size * accumulate
    if total % parts:
        raise ConfigError(
            f"data.global_batch_size={total} does not split over {world_size} process(es) x "
            f"{accumulate} accumulated batch(es); choose a multiple of {parts}, or null (data.batch_size)"
        )
    return total // parts


def processes(trainer: dict[str, Any]) -> int:
    """How many processes Lightning trains in: ``devices`` (a count, a list, or ``auto``/-1: every
    CUDA device when it trains on them, else one) times ``num_nodes``."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices.strip().isdigit():  # Lightning reads "2" as 2
        devices = int(devices)
    if isinstance(devices, list | tuple):
        count = len(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
    else:
        count = 1
    return count * int(trainer.get("num_nodes", 1))


def check_batches(cfg: DictConfig, captions: int, where: str, trainer: dict[str, Any]) -> None:
    """Every process gets at least one full batch of the ``captions`` training records.

    Training batches are always full (``drop_last``: the loader resumes mid-epoch by counting
    them, and the InfoNCE losses compare a fixed number of pairs), so a batch larger than a
    process's share of the training set would train nothing: a config error, not a shorter batch.
    """
    world = processes(trainer)
    batch = device_batch_size(cfg.data, world, int(trainer.get("accumulate_grad_batches", 1)))
    share = math.ceil(captions / world)
    if batch > share:
        name = "global_batch_size" if cfg.data.get("global_batch_size") is not None else "batch_size"
        per = f"; {share} for each of {world} processes" if world > 1 else ""
        raise ConfigError(
            f"data.{name}={cfg.data[name]}: the training set has {captions} captions ({where}{per}), "
            f"fewer than one batch of {batch}; batches are full, so nothing would train: choose a "
            "smaller batch, or more training data"
        )


def check_training_data(layout: ReleaseLayout, weights: dict[str, float]) -> None:
    """The annotation and image files of training, and those of every loss with a weight > 0."""
    for path in (
        layout.train_records,
        layout.val_records,
        layout.images_npz("train"),
        layout.images_npz("val"),
    ):
        require_file(path, "data.root", layout.root, "point data.root at a complete release folder")
    for name, weight in weights.items():
        for path, folder in loss_files(layout, name) if weight > 0 else []:
            require_file(
                path,
                f"losses.{name}",
                weight,
                f"set losses.{name}=0, or set {folder} to the folder holding {path.name}",
            )
    check_prepared_fields(layout.train_records, weights)


def check_prepared_fields(path: Path, weights: dict[str, float]) -> None:
    """The training lines hold the prepared fields (``segs``, ``preds``) the enabled losses read.

    Only the first line is read here (data preparation adds a field to every line at once); the
    dataset checks every line when it reads them.
    """
    where, first = first_row(path)
    for field in PREPARED_FIELDS:
        users = [n for n, w in weights.items() if w > 0 and field in prepared_fields(LOSSES[n].inputs)]
        if users and field not in first:
            given = ", ".join(f"losses.{n}={weights[n]}" for n in users)
            off = " ".join(f"losses.{n}=0" for n in users)
            raise ConfigError(f"{given}: {where} has no {how_to_prepare(field, path)} first, or set {off}")


def check_train_values(cfg: DictConfig) -> None:
    """The ranges of the training keys (types are the schema's)."""
    optim, trainer = cfg.optim, cfg.trainer
    check_seed(cfg)
    require(optim.lr > 0, "optim.lr", optim.lr, "the learning rate must be > 0")
    at_least(cfg, "optim.weight_decay", 0, kind="a number")
    require(optim.eps > 0, "optim.eps", optim.eps, "must be > 0")
    betas = list(optim.betas)
    require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas", betas, "two numbers in [0, 1)")
    require(optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps, "must be at least 0")
    require(optim.max_logit_scale > 0, "optim.max_logit_scale", optim.max_logit_scale, "must be > 0")
    ddp = cfg.loss_options.ddp_gradient
    require(ddp in DDP_GRADIENTS, "loss_options.ddp_gradient", ddp, f"choose one of {list(DDP_GRADIENTS)}")
    at_least(cfg, "optim.schedule_epochs", 1, "trainer.max_epochs")
    for key, null_means in (
        ("data.batch_size", None),
        ("data.val_batch_size", None),
        ("data.global_batch_size", "data.batch_size per process"),
        ("checkpoint.every_n_train_steps", "each epoch"),
    ):
        at_least(cfg, key, 1, null_means)
    check_data_values(cfg)
    require(
        cfg.loss_options.margin_reduction in MARGIN_REDUCTIONS,
        "loss_options.margin_reduction",
        cfg.loss_options.margin_reduction,
        f"choose one of {list(MARGIN_REDUCTIONS)}",
    )
    require(
        cfg.data.fallback_mask in FALLBACK_MASKS,
        "data.fallback_mask",
        cfg.data.fallback_mask,
        f"choose one of {list(FALLBACK_MASKS)}",
    )
    epochs = trainer.max_epochs
    require(
        epochs is None or epochs == -1 or epochs >= 1,
        "trainer.max_epochs",
        epochs,
        "must be at least 1, or -1 (until trainer.max_steps)",
    )
    require(
        trainer.max_steps == -1 or trainer.max_steps >= 1,
        "trainer.max_steps",
        trainer.max_steps,
        "must be at least 1, or -1 (trainer.max_epochs decides)",
    )
    for key in ("accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
        at_least(cfg, f"trainer.{key}", 1)
    at_least(cfg, "trainer.gradient_clip_val", 0, "no clipping", "a number")
    for key in ("limit_train_batches", "limit_val_batches", "overfit_batches", "val_check_interval"):
        value = trainer.get(key)
        require(
            value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0),
            f"trainer.{key}",
            value,
            "a number of batches (an integer) or a fraction of them (a float), at least 0",
        )
    run = trainer.fast_dev_run
    require(
        isinstance(run, bool) or (isinstance(run, int) and run >= 0),
        "trainer.fast_dev_run",
        run,
        "true, false or a number of batches",
    )
    require(
        trainer.deterministic in (None, True, False, "warn"),
        "trainer.deterministic",
        trainer.deterministic,
        "true, false or warn",
    )
    require(
        trainer.accelerator not in ("gpu", "cuda") or torch.cuda.is_available(),
        "trainer.accelerator",
        trainer.accelerator,
        "no CUDA device on this machine; use trainer=cpu, or trainer.accelerator=auto",
    )


def trainer_arguments(cfg: DictConfig, checked: DictConfig) -> dict[str, Any]:
    """The ``lightning.Trainer`` keyword arguments: the ``trainer`` keys the config sets (``cfg``,
    as composed; values from the ``checked`` one), then ``trainer.extra``; precision and the
    progress bar resolved."""
    import lightning as L

    from agree.config import resolve_precision
    from agree.progress import interactive

    values = OmegaConf.to_container(checked.trainer, resolve=True)
    extra = values.pop("extra")
    arguments = {key: values[key] for key in cfg.trainer if key != "extra"}
    ours = {"self", "logger", "callbacks", "default_root_dir", "plugins"}  # set by agree.train
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - ours
    for key in extra:
        if key in TrainerConfig.__dataclass_fields__:
            raise ConfigError(f"trainer.extra.{key}: set trainer.{key} instead (a typed key)")
        require(key in accepted, f"trainer.extra.{key}", extra[key], "not a lightning.Trainer argument")
    arguments.update(extra)
    arguments["precision"] = resolve_precision(arguments.get("precision"), checked.gpu_precision)
    if arguments.get("enable_progress_bar") is None:
        arguments["enable_progress_bar"] = interactive()
    return arguments


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``agree.train`` derives from its config, checked."""

    cfg: DictConfig  # the config merged into its schema (model size and normalisation filled in)
    output_dir: Path
    weights: dict[str, float]  # every loss's weight, drop_loss applied
    model: ModelSettings
    layout: ReleaseLayout
    scenes: SceneConfig | None  # the scenes to generate under layout.root (None: real data)
    resume: str | None  # the checkpoint to resume from
    trainer: dict[str, Any]  # lightning.Trainer keyword arguments

    def device_batch_size(self, world_size: int, accumulate: int = 1) -> int:
        return device_batch_size(self.cfg.data, world_size, accumulate)


def train_settings(cfg: DictConfig) -> TrainSettings:
    """Every check of ``agree.train``'s config, before anything is built or written; fills the
    model's own image size and normalisation into ``cfg`` where it leaves them null."""
    checked = typed(TrainConfig, cfg)
    weights = config_loss_weights(cfg)  # as given: the errors show the user's values
    check_train_values(checked)
    check_data_group(checked.data)
    check_model(checked.model, checked.model.pretrained)
    resolve_model(cfg)  # the data config interpolates the model's size and normalisation
    checked = typed(TrainConfig, cfg, resolve=True)
    layout = check_data_root(checked.data)
    trainer = trainer_arguments(cfg, checked)
    scenes = scene_config(checked.data)
    if layout is not None:
        check_training_data(layout, weights)
        check_npz_images(layout, checked.model, "train")
        captions = sum(1 for _ in nonblank_lines(layout.train_records))
        check_batches(checked, captions, str(layout.train_records), trainer)
    else:
        per_image = scenes.train_captions // scenes.train_images
        where = f"data.synthetic: {scenes.train_images} images x {per_image} captions"
        check_batches(checked, scenes.train_captions, where, trainer)
    return TrainSettings(
        cfg=checked,
        output_dir=Path(checked.output_dir),
        weights=weights,
        model=model_settings(checked, checked.model.pretrained),
        layout=data_layout(checked.data),
        scenes=scenes,
        resume=resume_path(checked.ckpt_path, checked.output_dir),
        trainer=trainer,
    )


def config_loss_weights(cfg: DictConfig) -> dict[str, float]:
    """The ``losses`` weights of a training config, checked, with ``drop_loss`` (an ablation) set to 0."""
    return loss_weights(cfg.losses, cfg.get("drop_loss"))


def enabled_losses(cfg: DictConfig) -> list[str]:
    """The losses with a weight above 0 (``drop_loss`` applied), in the config's order."""
    return [name for name, weight in config_loss_weights(cfg).items() if weight > 0]
