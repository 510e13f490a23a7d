"""The configuration of ``agree.train`` and ``agree.evaluate``, checked once, before any work.

``train_settings(cfg)`` and ``evaluate_settings(cfg)`` merge the composed Hydra config into its
schema (``agree.schema``: every key typed, unknown keys refused), check ranges, files, the model
and the device, and return one typed object with every value the entry point derives from them:
loss weights, data layout, resume path, model name and weights, image size, Trainer arguments,
device. Each failure raises :class:`ConfigError` with one line naming the key and what to do.
Files of ``data=synthetic`` are generated on demand, so only real data is checked on disk.

Model and Lightning code is imported inside the checks that need it: an evaluation from feature
files loads none.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from agree.config import data_layout, generated, resolve_device, resolve_model, resolve_path, scene_config
from agree.data.datasets import FALLBACK_MASKS
from agree.data.layout import ReleaseLayout
from agree.data.synthetic import OWNER, SceneConfig
from agree.errors import ConfigError
from agree.folders import check_claim
from agree.model.registry import loss_files, loss_weights
from agree.schema import EvaluateConfig, TrainConfig, TrainerConfig

RERANK_STAGES = ("egr", "tbr")


# ---------------------------------------------------------------------------------------------
# the schema


def typed(schema: type, cfg: DictConfig, resolve: bool = False) -> DictConfig:
    """``cfg`` merged into ``schema``: a wrong type or an unknown key is one ConfigError naming it.

    ``resolve``: also resolve every interpolation, checking the types of the values it brings.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        if resolve:
            OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_schema_error(e)) from None
    return merged


def _schema_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "config"
    reason = str(error).splitlines()[0]
    if isinstance(error, ConfigKeyError) and " not in " in reason:
        where = (
            "; any other lightning.Trainer argument goes under trainer.extra"
            if key.startswith("trainer.")
            else ""
        )
        return f"{key} is not a setting (check the spelling; the keys are in the README){where}"
    value = getattr(error, "value", None)
    return f"{key}={value}: {reason}" if value is not None else f"{key}: {reason}"


def _require(ok: bool, key: str, value: object, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {what}")


def _at_least(
    node: DictConfig, key: str, low: int, null: str | None = None, kind: str = "an integer"
) -> None:
    """``node[key]`` is >= ``low`` (or null, where ``null`` says what null means)."""
    value = OmegaConf.select(node, key)
    if value is None and null:
        return
    hint = f", or null ({null})" if null else ""
    _require(value is not None and value >= low, key, value, f"must be {kind} >= {low}{hint}")


# ---------------------------------------------------------------------------------------------
# shared pieces


@dataclass(frozen=True)
class ModelSettings:
    """The model to build: open_clip ``name``, its weights (a tag, a file, a checkpoint or None)
    and its input size and normalisation."""

    name: str
    pretrained: str | None
    image_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def model_settings(cfg: DictConfig, pretrained: str | None) -> ModelSettings:
    m = cfg.model
    return ModelSettings(
        m.name,
        pretrained,
        m.image_size,
        tuple(m.mean) if m.mean is not None else None,
        tuple(m.std) if m.std is not None else None,
    )


def check_model(model: DictConfig, pretrained: str | None) -> None:
    """The architecture and weights (``agree.model.clip.check_model``), and ``model.image_size``:
    null or the architecture's own input size (open_clip builds no other)."""
    import open_clip

    from agree.model.clip import check_model as check_name_and_weights

    check_name_and_weights(model.name, pretrained)
    native = open_clip.get_model_config(model.name).get("vision_cfg", {}).get("image_size")
    native = native[0] if isinstance(native, (list, tuple)) else native
    if model.image_size is not None and native is not None and model.image_size != native:
        raise ConfigError(
            f"model.name={model.name} takes {native}-px images, not model.image_size={model.image_size}: "
            f"set model.image_size=null (or {native}), or choose a model made for {model.image_size} px "
            "(the scenes follow model.image_size)"
        )


def check_data_group(data: DictConfig) -> None:
    """``data.root`` is set and ``data.kind`` known (before the paths that interpolate them resolve)."""
    if OmegaConf.is_missing(data, "root"):
        raise ConfigError(
            "data.root is not set: give data.root=<the release folder holding annotation/ and objects/>"
        )
    if data.get("kind") not in ("scenes", "release"):
        raise ConfigError(
            f"data.kind={data.get('kind')}: choose the data group (data=synthetic or data=flickr30k)"
        )


def check_data_root(data: DictConfig) -> ReleaseLayout | None:
    """The layout of real data whose root exists; None for ``data=synthetic`` (generated on demand)."""
    check_data_group(data)
    if generated(data):
        check_claim(resolve_path(data.root), OWNER, scene_config(data).params())  # never into a user's folder
        return None
    layout = data_layout(data)
    if not layout.root.is_dir():
        raise ConfigError(
            f"data.root={data.root}: no such directory ({layout.root}); point it at the release folder"
        )
    return layout


def check_data_values(cfg: DictConfig) -> None:
    """Ranges of the ``data`` keys both commands read."""
    _at_least(cfg, "data.num_workers", 0)
    _at_least(cfg, "data.max_entities", 1)
    _at_least(cfg, "data.max_entity_words", 1, "any length")
    if cfg.data.synthetic is not None:
        for key in ("train_images", "val_images", "test_images", "captions_per_image", "min_objects"):
            _at_least(cfg, f"data.synthetic.{key}", 1)


def require_file(path: Path, key: str, value: object, what_to_do: str) -> None:
    """Fail naming ``key=value`` when ``path`` is not a file."""
    if not path.is_file():
        raise ConfigError(f"{key}={value}: {path} not found; {what_to_do}")


def check_checkpoint(ckpt_path: str) -> Path:
    """An existing checkpoint file named by ``ckpt_path``."""
    path = resolve_path(ckpt_path)
    require_file(path, "ckpt_path", ckpt_path, "give a checkpoint written by agree.train, or drop ckpt_path")
    return path


def check_device(device: str, key: str = "device") -> torch.device:
    """``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) as a torch device present on this machine."""
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        raise ConfigError(f"{key}={device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _require(
            (resolved.index or 0) < count,
            key,
            device,
            f"this machine has {count} CUDA device(s); use {key}=auto, cpu"
            + (f" or cuda:0 to cuda:{count - 1}" if count else ""),
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# training


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


def check_train_values(cfg: DictConfig) -> None:
    """The ranges of the training keys (types are the schema's)."""
    optim, trainer = cfg.optim, cfg.trainer
    _require(optim.lr > 0, "optim.lr", optim.lr, "the learning rate must be > 0")
    _at_least(cfg, "optim.weight_decay", 0, kind="a number")
    _require(optim.eps > 0, "optim.eps", optim.eps, "must be > 0")
    betas = list(optim.betas)
    _require(
        len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas", betas, "two numbers in [0, 1)"
    )
    _require(optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps, "must be at least 0")
    _at_least(cfg, "optim.schedule_epochs", 1, "trainer.max_epochs")
    for key, null_means in (
        ("data.batch_size", None),
        ("data.val_batch_size", None),
        ("data.global_batch_size", "data.batch_size per process"),
        ("checkpoint.every_n_train_steps", "each epoch"),
    ):
        _at_least(cfg, key, 1, null_means)
    check_data_values(cfg)
    _require(
        cfg.data.fallback_mask in FALLBACK_MASKS,
        "data.fallback_mask",
        cfg.data.fallback_mask,
        f"choose one of {list(FALLBACK_MASKS)}",
    )
    epochs = trainer.max_epochs
    _require(
        epochs is None or epochs == -1 or epochs >= 1,
        "trainer.max_epochs",
        epochs,
        "must be at least 1, or -1 (until trainer.max_steps)",
    )
    _require(
        trainer.max_steps == -1 or trainer.max_steps >= 1,
        "trainer.max_steps",
        trainer.max_steps,
        "must be at least 1, or -1 (trainer.max_epochs decides)",
    )
    for key in ("accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
        _at_least(cfg, f"trainer.{key}", 1)
    _at_least(cfg, "trainer.gradient_clip_val", 0, "no clipping", "a number")
    for key in ("limit_train_batches", "limit_val_batches", "overfit_batches", "val_check_interval"):
        value = trainer.get(key)
        _require(
            value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0),
            f"trainer.{key}",
            value,
            "a number of batches (an integer) or a fraction of them (a float), at least 0",
        )
    run = trainer.fast_dev_run
    _require(
        isinstance(run, bool) or (isinstance(run, int) and run >= 0),
        "trainer.fast_dev_run",
        run,
        "true, false or a number of batches",
    )
    _require(
        trainer.deterministic in (None, True, False, "warn"),
        "trainer.deterministic",
        trainer.deterministic,
        "true, false or warn",
    )
    _require(
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
        _require(key in accepted, f"trainer.extra.{key}", extra[key], "not a lightning.Trainer argument")
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
    if layout is not None:
        check_training_data(layout, weights)
    return TrainSettings(
        cfg=checked,
        output_dir=Path(checked.output_dir),
        weights=weights,
        model=model_settings(checked, checked.model.pretrained),
        layout=data_layout(checked.data),
        scenes=scene_config(checked.data),
        resume=resume_path(checked.ckpt_path, checked.output_dir),
        trainer=trainer_arguments(cfg, checked),
    )


def config_loss_weights(cfg: DictConfig) -> dict[str, float]:
    """The ``losses`` weights of a training config, checked, with ``drop_loss`` (an ablation) set to 0."""
    return loss_weights(cfg.losses, cfg.get("drop_loss"))


def enabled_losses(cfg: DictConfig) -> list[str]:
    """The losses with a weight above 0 (``drop_loss`` applied), in the config's order."""
    return [name for name, weight in config_loss_weights(cfg).items() if weight > 0]


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True)
class EvaluateSettings:
    """Everything ``agree.evaluate`` derives from its config, checked."""

    cfg: DictConfig  # the config merged into its schema
    output_dir: Path
    from_files: bool  # features from reference JSONL files, not from a model
    model: ModelSettings | None  # None: from feature files
    layout: ReleaseLayout | None  # None: feature files and annotation files, no data folder
    scenes: SceneConfig | None  # the scenes to generate under layout.root
    device: torch.device
    rerank: dict[str, Any]  # the re-ranking arguments of retrieval.pipeline.rank_stages


def check_rerank(cfg: DictConfig) -> dict[str, Any]:
    """The ``rerank`` keys in range, as ``rank_stages`` arguments."""
    rerank = cfg.rerank
    for stage in rerank.stages:
        _require(stage in RERANK_STAGES, "rerank.stages", list(rerank.stages), f"stages are {RERANK_STAGES}")
    for key in ("k", "depth", "max_entities"):
        _at_least(cfg, f"rerank.{key}", 1)
    _at_least(cfg, "rerank.max_entity_words", 1, "any length")
    _require(rerank.absent_rank >= rerank.k, "rerank.absent_rank", rerank.absent_rank, "must be >= rerank.k")
    if "egr" in rerank.stages:
        _require(rerank.depth >= rerank.k, "rerank.depth", rerank.depth, f"must be >= rerank.k={rerank.k}")
    plain = OmegaConf.to_container(rerank, resolve=True)
    return {
        "stages": plain["stages"],
        "k": plain["k"],
        "depth": plain["depth"],
        "absent_rank": plain["absent_rank"],
        "text_to_image": plain["text_to_image"],
        "image_to_text": plain["image_to_text"],
    }


def check_feature_files(cfg: DictConfig) -> None:
    """``features.*``: given together, existing, with the entity features EGR needs."""
    f = cfg.features
    if bool(f.image_jsonl) != bool(f.text_jsonl):
        raise ConfigError("features.image_jsonl and features.text_jsonl go together: give both or neither")
    if f.image_jsonl and "egr" in cfg.rerank.stages and not (f.prompt_jsonl and f.mask_jsonl):
        raise ConfigError(
            f"rerank={'+'.join(cfg.rerank.stages)} needs entity features: set features.prompt_jsonl and "
            "features.mask_jsonl, or extract them with a model (drop features.*)"
        )
    for key in ("image_jsonl", "text_jsonl", "prompt_jsonl", "mask_jsonl"):
        if f[key] and not resolve_path(f[key]).is_file():
            raise ConfigError(f"features.{key}={f[key]}: file not found")


def check_entity_counts(cfg: DictConfig, layout: ReleaseLayout | None) -> None:
    """``features.mask_padding`` on JSONL entity features needs each query's entity count (text_segs)."""
    f = cfg.features
    if not (f.image_jsonl and "egr" in cfg.rerank.stages and f.mask_padding) or cfg.annotations.text_segs:
        return
    uses_data_root = not (cfg.annotations.images and cfg.annotations.texts)
    if uses_data_root and (generated(cfg.data) or layout.test_text_segs.is_file()):
        return  # generated data (which has its text_segs), or the file under data.root
    raise ConfigError(
        "features.mask_padding=true needs each query's entity count: set annotations.text_segs="
        "<flickr30k_test_texts_segs.jsonl>, or features.mask_padding=false (method=reference) to "
        "score all 10 vectors as the release does"
    )


def check_test_data(cfg: DictConfig, layout: ReleaseLayout | None, from_files: bool) -> None:
    """The annotation files given, and those under ``data.root`` the evaluation reads."""
    annotations = cfg.annotations
    for key in ("images", "texts", "text_segs"):
        if annotations[key]:
            require_file(
                resolve_path(annotations[key]), f"annotations.{key}", annotations[key], "fix the path"
            )
    if layout is None:
        return
    needed = {"texts": layout.test_texts, "images": layout.test_images}
    if "egr" in cfg.rerank.stages and not from_files:
        needed["text_segs"] = layout.test_text_segs
    for key, path in needed.items():
        if not annotations[key]:
            require_file(path, "data.root", cfg.data.root, f"set annotations.{key}, or fix data.root")
    if not from_files:
        require_file(layout.images_npz("test"), "data.root", cfg.data.root, "fix data.root")


def evaluate_settings(cfg: DictConfig) -> EvaluateSettings:
    """Every check of ``agree.evaluate``'s config, before any work; fills the model's own image size
    and normalisation into ``cfg`` where it leaves them null (when a model or data folder is used)."""
    checked = typed(EvaluateConfig, cfg)
    for key in ("batch_size", "devices"):
        _at_least(checked, key, 1)
    device = check_device(checked.device)
    rerank = check_rerank(checked)
    check_feature_files(checked)
    from_files = bool(checked.features.image_jsonl)
    if checked.ckpt_required and not checked.ckpt_path and not from_files:
        raise ConfigError(
            "ckpt_path is not set, and this preset evaluates a fine-tuned model: "
            "give ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    pretrained = None
    if not from_files:
        pretrained = (
            str(check_checkpoint(checked.ckpt_path)) if checked.ckpt_path else checked.model.pretrained
        )
        check_model(checked.model, pretrained)
    uses_data = not (from_files and checked.annotations.images and checked.annotations.texts)
    layout = scenes = None
    if uses_data:  # no model, no data folder otherwise
        check_data_group(checked.data)
        resolve_model(cfg)
        checked = typed(EvaluateConfig, cfg, resolve=True)
        check_data_values(checked)
        check_data_root(checked.data)
        layout, scenes = data_layout(checked.data), scene_config(checked.data)
    check_test_data(checked, None if scenes is not None else layout, from_files)
    check_entity_counts(checked, layout)
    return EvaluateSettings(
        cfg=checked,
        output_dir=Path(checked.output_dir),
        from_files=from_files,
        model=None if from_files else model_settings(checked, pretrained),
        layout=layout,
        scenes=scenes,
        device=device,
        rerank=rerank,
    )
