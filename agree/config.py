"""Shared glue between Hydra configs and the library: paths, data layout, precision."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from agree.data.layout import ReleaseLayout, resolve_path
from agree.data.synthetic import SceneConfig, ensure_generated
from agree.model.embedded import embedded_weights

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OmegaConf.register_new_resolver("agree_weights", embedded_weights, replace=True)  # model=scenes_pretrained


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


def _precision_flags() -> list[tuple[object, str]]:
    """(namespace, attribute) of torch's float32 precision flags besides
    ``torch.get_float32_matmul_precision()``, a namespace before those under it (setting one sets
    those under it). torch >= 2.9 has ``fp32_precision`` per backend (reading its legacy
    ``allow_tf32`` flags then fails); before, the matmul flag follows the matmul precision."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        spaces = (b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn)
        spaces += (b.mkldnn, b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn.rnn)
        return [(space, "fp32_precision") for space in spaces]
    return [(b.cudnn, "allow_tf32")]


@contextmanager
def torch_flags() -> Iterator[None]:
    """Every global torch flag a run may change, restored when the block (or the function it
    decorates) ends: float32 precision (TF32), cuDNN benchmark and determinism, deterministic
    algorithms (Lightning's ``deterministic`` and ``benchmark``). So an evaluation after a training
    in one process (demo, study) computes what it computes in a process of its own.
    """
    matmul = torch.get_float32_matmul_precision()
    flags = [
        *_precision_flags(),
        (torch.backends.cudnn, "benchmark"),
        (torch.backends.cudnn, "deterministic"),
    ]
    saved = [getattr(space, name) for space, name in flags]
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")  # Lightning sets it for determinism
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)  # first: it also sets some of the flags
        for (space, name), value in zip(flags, saved, strict=True):
            setattr(space, name, value)
        now = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        if now != (deterministic, warn_only):  # only when changed: the call imports torch's compiler stack
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


P, R = ParamSpec("P"), TypeVar("R")


def restores_torch_flags(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run inside :func:`torch_flags`. A plain wrapper, not ``@torch_flags()``: a context
    manager used as a decorator holds a generator, which a launcher pickling the entry point
    (Hydra's submitit launcher, ``python -m agree.train``) cannot pickle."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch_flags():
            return fn(*args, **kwargs)

    return wrapper


def allow_tf32(enabled: bool) -> None:
    """TF32 (float32 range, 10-bit mantissa) on or off for float32 matrix products on CUDA (cuDNN's
    convolutions keep torch's default, TF32); no-op on CPU. A global setting: call it inside
    ``torch_flags``."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high" if enabled else "highest")


def merge_overrides(defaults: list[str], overrides: list[str]) -> list[str]:
    """``key=value`` overrides: ``defaults`` with the keys that ``overrides`` also set replaced by theirs."""
    given = {o.split("=", 1)[0] for o in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides)
