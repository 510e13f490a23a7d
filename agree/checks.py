"""Configuration checks that run before any work starts.

Each failure raises :class:`ConfigError` with one line naming the key and what to do. Files of
``data=synthetic`` are generated on demand, so only real data is checked on disk.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from agree.config import data_layout, generated, resolve_model, resolve_path, scene_config
from agree.data.datasets import FALLBACK_MASKS
from agree.model.registry import LOSSES as LOSS_INPUTS
from agree.data.formats import ReleaseLayout
from agree.data.synthetic import OWNER
from agree.errors import ConfigError
from agree.folders import check_claim

WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


# ---------------------------------------------------------------------------------------------
# shared pieces


def check_data_root(data: DictConfig) -> ReleaseLayout | None:
    """The layout of real data whose root exists; None for ``data=synthetic`` (generated on demand)."""
    if OmegaConf.is_missing(data, "root"):
        raise ConfigError(
            "data.root is not set: give data.root=<the release folder holding annotation/ and objects/>"
        )
    if data.get("kind") not in ("scenes", "release"):
        raise ConfigError(
            f"data.kind={data.get('kind')}: choose the data group (data=synthetic or data=flickr30k)"
        )
    if generated(data):
        check_claim(resolve_path(data.root), OWNER, scene_config(data).params())  # never into a user's folder
        return None
    layout = data_layout(data)
    if not layout.root.is_dir():
        raise ConfigError(
            f"data.root={data.root}: no such directory ({layout.root}); point it at the release folder"
        )
    return layout


def require_file(path: Path, key: str, value: object, what_to_do: str) -> None:
    """Fail naming ``key=value`` when ``path`` is not a file."""
    if not path.is_file():
        raise ConfigError(f"{key}={value}: {path} not found; {what_to_do}")


def check_model(model: DictConfig, pretrained: str | None) -> None:
    """``model.name`` is an open_clip architecture; ``pretrained`` an existing file or one of its tags."""
    # imported here, not at the top: evaluation from feature files loads no model code
    import open_clip

    from agree.model import clip  # noqa: F401  (registers the tiny model config with open_clip)

    if model.name not in open_clip.list_models():
        raise ConfigError(
            f"model.name={model.name} is not an open_clip architecture; choose model=tiny, vit_b32 or vit_l14"
        )
    if not pretrained or resolve_path(pretrained).is_file():
        return
    if Path(pretrained).suffix in WEIGHT_SUFFIXES or "/" in str(pretrained):
        raise ConfigError(
            f"model.pretrained={pretrained}: file not found ({resolve_path(pretrained)}); "
            "give an existing weights file, an open_clip tag, or null"
        )
    tags = open_clip.list_pretrained_tags_by_model(model.name)
    if pretrained not in tags:
        raise ConfigError(
            f"model.pretrained={pretrained} is neither a file nor a pretrained tag of {model.name}; "
            f"the tags are {tags}"
        )


def check_checkpoint(ckpt_path: str) -> Path:
    """An existing checkpoint file named by ``ckpt_path``."""
    path = resolve_path(ckpt_path)
    require_file(path, "ckpt_path", ckpt_path, "give a checkpoint written by agree.train, or drop ckpt_path")
    return path


# ---------------------------------------------------------------------------------------------
# training


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, where ``last`` is the run's own last checkpoint."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path != "last":
        return str(check_checkpoint(cfg.ckpt_path))
    path = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
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


def check_loss_weights(cfg: DictConfig) -> dict[str, float]:
    """The ``losses`` weights are known losses, numbers >= 0, at least one > 0 after ``drop_loss``."""
    weights = {}
    for name, weight in cfg.losses.items():
        if name not in LOSS_INPUTS:
            raise ConfigError(f"losses.{name} is not a loss; the losses are {sorted(LOSS_INPUTS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(
                f"losses.{name}={weight}: a loss weight is a number >= 0 (0 turns the loss off)"
            )
        weights[name] = float(weight)
    dropped = cfg.get("drop_loss")
    if dropped not in (None, "none"):
        if dropped not in weights:
            raise ConfigError(f"drop_loss={dropped!r} is not a loss; choose one of {sorted(weights)}")
        weights[dropped] = 0.0
    if not any(weights.values()):
        raise ConfigError(
            "every losses.* weight is 0: nothing to train; set losses.clip=1 (or choose losses=agree)"
        )
    return weights


def loss_files(layout: ReleaseLayout, need: str) -> list[tuple[Path, str]]:
    """The files an entity input (``LOSS_INPUTS``) is read from, with the key of their folder."""
    return {
        "ground_masked": [(layout.grounding_npz, "data.root")],
        "vg": [
            (layout.vg_images_npz, "data.vg_root"),
            (layout.vg_vocab, "data.vg_root"),
            (layout.image_objects("train"), "data.root"),
        ],
        "vg_masked": [(layout.vg_mask_images_npz, "data.vg_root")],
    }.get(need, [])


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
        for need in sorted(LOSS_INPUTS[name]) if weight > 0 else []:
            for path, folder in loss_files(layout, need):
                require_file(
                    path,
                    f"losses.{name}",
                    weight,
                    f"set losses.{name}=0, or set {folder} to the folder holding {path.name}",
                )


def check_train_config(cfg: DictConfig) -> None:
    """Every check of ``agree.train``'s config, before anything is built or written."""
    weights = check_loss_weights(cfg)
    for key in ("batch_size", "val_batch_size"):
        if not (isinstance(cfg.data[key], int) and cfg.data[key] >= 1):
            raise ConfigError(f"data.{key}={cfg.data[key]}: must be an integer >= 1")
    for key, null_means in (
        ("data.global_batch_size", "data.batch_size per process"),
        ("optim.schedule_epochs", "trainer.max_epochs"),
        ("checkpoint.every_n_train_steps", "each epoch"),
    ):
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{key}={value}: must be an integer >= 1, or null ({null_means})")
    if cfg.data.fallback_mask not in FALLBACK_MASKS:
        raise ConfigError(
            f"data.fallback_mask={cfg.data.fallback_mask}: choose one of {list(FALLBACK_MASKS)}"
        )
    resolve_model(cfg)  # the model's own image size and normalisation, where the config leaves them null
    layout = check_data_root(cfg.data)
    if layout is not None:
        check_training_data(layout, weights)
    check_model(cfg.model, cfg.model.pretrained)
    resume_path(cfg)


# ---------------------------------------------------------------------------------------------
# evaluation


def check_evaluate_config(cfg: DictConfig) -> None:
    """The checks of ``agree.evaluate`` beyond its feature-file ones (``evaluate.check_config``)."""
    annotations, from_files = cfg.annotations, bool(cfg.features.image_jsonl)
    egr = "egr" in cfg.rerank.stages
    for key in ("images", "texts", "text_segs"):
        if annotations[key]:
            require_file(
                resolve_path(annotations[key]), f"annotations.{key}", annotations[key], "fix the path"
            )
    if cfg.get("ckpt_required") and not cfg.ckpt_path and not from_files:
        raise ConfigError(
            "ckpt_path is not set, and this preset evaluates a fine-tuned model: "
            "give ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    if from_files and annotations.images and annotations.texts:
        return  # no model, no data folder
    resolve_model(cfg)
    layout = check_data_root(cfg.data)
    if layout is not None:
        needed = {"texts": layout.test_texts, "images": layout.test_images}
        if egr and not from_files:
            needed["text_segs"] = layout.test_text_segs
        for key, path in needed.items():
            if not annotations[key]:
                require_file(path, "data.root", cfg.data.root, f"set annotations.{key}, or fix data.root")
        if not from_files:
            require_file(layout.images_npz("test"), "data.root", cfg.data.root, "fix data.root")
    if not from_files:
        if cfg.ckpt_path:
            check_checkpoint(cfg.ckpt_path)
        check_model(cfg.model, None if cfg.ckpt_path else cfg.model.pretrained)
