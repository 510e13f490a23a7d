"""Shared glue between Hydra configs and the library: paths, data layout, precision."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from agree.data.formats import ReleaseLayout
from agree.data.synthetic import SceneConfig, ensure_generated

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_path(path: str | os.PathLike) -> Path:
    """A user path, relative to the launch directory (Hydra does not change it; we never chdir)."""
    return Path(path).expanduser().resolve()


def data_layout(data: DictConfig) -> ReleaseLayout:
    """The release layout named by the ``data`` config group."""
    return ReleaseLayout(resolve_path(data.root), resolve_path(data.vg_root), int(data.image_size))


def scene_config(data: DictConfig) -> SceneConfig | None:
    """The synthetic dataset's parameters, or None for real data."""
    return (
        SceneConfig(**OmegaConf.to_container(data.synthetic, resolve=True)) if data.get("synthetic") else None
    )


def ensure_data(data: DictConfig) -> ReleaseLayout:
    """The layout, generating the embedded dataset first when the config asks for it."""
    layout = data_layout(data)
    scenes = scene_config(data)
    if scenes is not None:
        ensure_generated(layout.root, scenes)
    return layout


def resolve_precision(precision: str | None) -> str:
    """Mixed precision when a GPU is present (bf16 where supported), full precision on CPU."""
    if precision:
        return str(precision)
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def resolve_device(device: str) -> torch.device:
    return torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )


def loss_weights_preset(name: str) -> dict[str, float]:
    """The weights of a ``losses`` config group option (``clip``, ``agree``)."""
    path = Path(__file__).parent / "conf" / "losses" / f"{name}.yaml"
    return {key: float(value) for key, value in OmegaConf.load(path).items()}


def merge_overrides(defaults: list[str], overrides: list[str]) -> list[str]:
    """``key=value`` overrides: ``defaults`` with the keys that ``overrides`` also set replaced by theirs."""
    given = {o.split("=", 1)[0] for o in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides)
