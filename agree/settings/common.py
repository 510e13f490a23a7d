"""Checks shared by the training and the evaluation settings: the schema merge, ranges, the model,
the data folder, checkpoints and devices; each failure is one :class:`ConfigError` line naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from agree.config import data_layout, generated, resolve_device, scene_config
from agree.data.layout import ReleaseLayout, resolve_path
from agree.data.synthetic import OWNER, REGIMES
from agree.errors import ConfigError
from agree.folders import check_claim


def typed(schema: type, cfg: DictConfig, resolve: bool = False) -> DictConfig:
    """``cfg`` merged into ``schema``: a wrong type or an unknown key is one ConfigError naming it.

    ``resolve``: also resolve every interpolation, checking the types of the values it brings.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        if resolve:
            OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(schema_error(e)) from None
    return merged


def schema_error(error: OmegaConfBaseException) -> str:
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


def require(ok: bool, key: str, value: object, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {what}")


def at_least(node: DictConfig, key: str, low: int, null: str | None = None, kind: str = "an integer") -> None:
    """``node[key]`` is >= ``low`` (or null, where ``null`` says what null means)."""
    value = OmegaConf.select(node, key)
    if value is None and null:
        return
    hint = f", or null ({null})" if null else ""
    require(value is not None and value >= low, key, value, f"must be {kind} >= {low}{hint}")


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
    at_least(cfg, "data.num_workers", 0)
    at_least(cfg, "data.max_entities", 1)
    at_least(cfg, "data.max_entity_words", 1, "any length")
    if cfg.data.synthetic is not None:
        for key in ("train_images", "val_images", "test_images", "captions_per_image", "min_objects"):
            at_least(cfg, f"data.synthetic.{key}", 1)
        regime = cfg.data.synthetic.regime
        require(regime in REGIMES, "data.synthetic.regime", regime, f"choose one of {list(REGIMES)}")


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
        require(
            (resolved.index or 0) < count,
            key,
            device,
            f"this machine has {count} CUDA device(s); use {key}=auto, cpu"
            + (f" or cuda:0 to cuda:{count - 1}" if count else ""),
        )
    return resolved
