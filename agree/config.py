"""Shared glue between Hydra configs and the library: paths, data layout, precision."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from agree.data.layout import ReleaseLayout, resolve_path
from agree.data.synthetic import SceneConfig, ensure_generated

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model(cfg: DictConfig) -> None:
    """Fill ``model.image_size``, ``model.mean`` and ``model.std`` left at null with open_clip's values
    for ``model.name`` and the ``model.pretrained`` tag (the data config interpolates them).

    An unknown model or tag is left for the config checks to report; a weights file or checkpoint
    gets the architecture's defaults (OpenAI's normalisation), which ``model.mean``/``std`` override.
    """
    model = cfg.model
    if all(model.get(key) is not None for key in ("image_size", "mean", "std")):
        return
    import open_clip  # here: evaluation from feature files imports no model code

    from agree.model.clip import preprocess_config

    if model.name not in open_clip.list_models():
        return
    tag = (
        model.pretrained if model.pretrained in open_clip.list_pretrained_tags_by_model(model.name) else None
    )
    found = preprocess_config(model.name, tag)
    size = found["size"] if isinstance(found["size"], int) else found["size"][0]
    with open_dict(cfg):
        for key, value in (
            ("image_size", int(size)),
            ("mean", list(found["mean"])),
            ("std", list(found["std"])),
        ):
            if model.get(key) is None:
                model[key] = value


def _resolved(data: DictConfig) -> DictConfig:
    """``data``, with the model's image size and normalisation it interpolates filled in first."""
    if any(data.get(key) is None for key in ("image_size", "mean", "std")):
        resolve_model(data._get_root())  # OmegaConf's root: the whole config ``data`` belongs to
    return data


def data_layout(data: DictConfig) -> ReleaseLayout:
    """The release layout named by the ``data`` config group."""
    data = _resolved(data)
    return ReleaseLayout(
        resolve_path(data.root),
        resolve_path(data.vg_root),
        int(data.image_size),
        data.get("prefix", "flickr30k"),
        mean=tuple(map(float, data.mean)),
        std=tuple(map(float, data.std)),
    )


def data_source(data: DictConfig) -> dict:
    """What a checkpoint records of its training data, and ``agree.evaluate`` compares with its own:
    ``kind``, ``root`` (absolute), ``prefix``, ``image_size``."""
    layout = data_layout(data)
    return {
        "kind": data.kind,
        "root": str(layout.root),
        "prefix": layout.prefix,
        "image_size": layout.image_size,
    }


def generated(data: DictConfig) -> bool:
    """Whether the ``data`` group is the generated scenes (``kind: scenes``), not a release folder.

    The group decides, never whether ``data.synthetic`` happens to be set (an experiment may set
    its keys under any group).
    """
    return data.get("kind") == "scenes"


def scene_config(data: DictConfig) -> SceneConfig | None:
    """The synthetic dataset's parameters, or None for real data."""
    if not generated(data):
        return None
    params = OmegaConf.to_container(_resolved(data).synthetic, resolve=True)
    return SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


def ensure_data(data: DictConfig) -> ReleaseLayout:
    """The layout, generating the embedded dataset first when the config asks for it."""
    layout = data_layout(data)
    scenes = scene_config(data)
    if scenes is not None:
        ensure_generated(layout.root, scenes)
    return layout


def resolve_precision(precision: str | None, gpu_precision: str = "bf16-mixed") -> str:
    """``precision`` when set; else ``gpu_precision`` when a GPU is present, full precision on CPU.

    ``bf16-mixed`` falls back to ``16-mixed`` (fp16 autocast and a gradient scaler) on a GPU
    without bf16.
    """
    if precision:
        return str(precision)
    if not torch.cuda.is_available():
        return "32-true"
    if gpu_precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        return "16-mixed"
    return str(gpu_precision)


def resolve_device(device: str) -> torch.device:
    return torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )


def loss_weights_preset(name: str) -> dict[str, float]:
    """The weights of a ``losses`` config group option (``clip``, ``agree``)."""
    path = Path(__file__).parent / "conf" / "losses" / f"{name}.yaml"
    return {key: float(value) for key, value in OmegaConf.load(path).items()}


def allow_tf32(enabled: bool) -> None:
    """TF32 matrix products and convolutions on CUDA (float32 range, 10-bit mantissa); no-op on CPU."""
    if enabled and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def merge_overrides(defaults: list[str], overrides: list[str]) -> list[str]:
    """``key=value`` overrides: ``defaults`` with the keys that ``overrides`` also set replaced by theirs."""
    given = {o.split("=", 1)[0] for o in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides)
