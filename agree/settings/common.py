"""Checks shared by the training and the evaluation settings: the schema merge, ranges, the model,
the data folder, checkpoints and devices; each failure is one :class:`ConfigError` line naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from agree.config import data_layout, generated, resolve_device, scene_config
from agree.data.json_lines import check_fields, read_json
from agree.data.layout import ReleaseLayout, resolve_path
from agree.data.npz_images import NpzImages
from agree.data.synthetic import OWNER, REGIMES
from agree.errors import ConfigError, DataFormatError, FolderNotOwnedError
from agree.folders import MARKER, check_claim


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
        root = resolve_path(data.root)
        try:
            check_claim(root, OWNER, scene_config(data).params())  # never into a user's folder
        except FolderNotOwnedError as e:
            if (root / "annotation").is_dir() and not (root / MARKER).exists():  # a release, not scenes
                raise ConfigError(
                    f"data.root={data.root}: a release folder (it holds annotation/) under data=synthetic, "
                    "which generates scenes there: add data=flickr30k to read it (or choose another "
                    "data.root for the scenes)"
                ) from e
            raise
        return None
    layout = data_layout(data)
    if not layout.root.is_dir():
        raise ConfigError(
            f"data.root={data.root}: no such directory ({layout.root}); point it at the release folder"
        )
    return layout


# lightning.seed_everything's range (numpy's 32-bit seeds); written out, as an evaluation from
# feature files imports no Lightning
SEEDS = (0, 2**32 - 1)


def check_seed(cfg: DictConfig, key: str = "seed") -> None:
    """``cfg[key]`` is a seed Lightning accepts."""
    value = OmegaConf.select(cfg, key)
    low, high = SEEDS
    require(low <= value <= high, key, value, f"a seed is an integer from {low} to {high}")


def prepare_model_keys(model: DictConfig) -> str:
    """``agree.prepare``'s model keys for ``model``: ``model=ViT-B-32-quickgelu pretrained=openai``."""
    import open_clip

    tag = (
        model.pretrained if model.pretrained in open_clip.list_pretrained_tags_by_model(model.name) else None
    )
    return f"model={model.name} pretrained={tag or 'null'}"


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))


def _numbers(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def check_npz_images(layout: ReleaseLayout, model: DictConfig, split: str) -> None:
    """The npz images were made for the model's input: the size and normalisation that
    ``agree.prepare karpathy`` records beside them, or (the release's own files, without that
    record) the size of the first array of the ``split`` npz."""
    made = layout.images_preprocessing
    if made.is_file():
        record = check_fields(read_json(made), {"image_size": int, "mean": list, "std": list}, str(made))
        size, mean, std = record["image_size"], record["mean"], record["std"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mean + std):
            raise DataFormatError(f"{made}: 'mean' and 'std' must be lists of numbers")
        images = f"{size} px, mean {_numbers(mean)}, std {_numbers(std)} ({made})"
    else:
        shape = NpzImages(layout.images_npz(split), layout.image_size).first_shape()
        if shape is None:
            return
        size, mean, std = shape[-1], layout.mean, layout.std
        images = f"{size} px ({layout.images_npz(split)})"
    same_norm = _close(mean, layout.mean) and _close(std, layout.std)
    if size == layout.image_size and same_norm:
        return
    wanted = f"{layout.image_size} px" + (
        "" if same_norm else f", mean {_numbers(layout.mean)}, std {_numbers(layout.std)}"
    )
    raise ConfigError(
        f"data.root={layout.root}: its npz images are {images}, but model.name={model.name} takes {wanted}: "
        "prepare them for this model with `python -m agree.prepare karpathy karpathy=<the Karpathy JSON> "
        f"images=<the image folder> root=<a new folder> {prepare_model_keys(model)}`, or choose a model "
        "made for those images"
    )


def check_data_values(cfg: DictConfig) -> None:
    """Ranges of the ``data`` keys both commands read."""
    at_least(cfg, "data.num_workers", 0)
    at_least(cfg, "data.max_entities", 1)
    at_least(cfg, "data.max_entity_words", 1, "any length")
    if cfg.data.synthetic is not None:
        check_seed(cfg, "data.synthetic.seed")
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
