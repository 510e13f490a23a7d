"""The settings of ``agree.evaluate``: features (model or files), layout, device, re-ranking, checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from agree.config import data_layout, data_source, generated, resolve_model, scene_config
from agree.data.feature_cache import default_cache_dir
from agree.data.layout import ReleaseLayout, resolve_path
from agree.data.synthetic import SceneConfig
from agree.errors import ConfigError
from agree.retrieval.entity_rows import CAPTION_ENTITIES, GALLERY_ORDERS, MASKED_TEXT_SOURCES
from agree.retrieval.features import PRECISIONS
from agree.retrieval.rerank import ACCUMULATE
from agree.schema import EvaluateConfig
from agree.settings.common import (
    ModelSettings,
    at_least,
    check_checkpoint,
    check_data_group,
    check_data_root,
    check_data_values,
    check_device,
    check_model,
    check_npz_images,
    check_seed,
    model_settings,
    require,
    require_file,
    typed,
)

RERANK_STAGES = ("egr", "tbr")
# the keys that name one of a few choices, with them
CHOICES = {
    "features.precision": PRECISIONS,
    "features.masked_text_source": MASKED_TEXT_SOURCES,
    "features.caption_entities": CAPTION_ENTITIES,
    "features.gallery_order": GALLERY_ORDERS,
    "rerank.accumulate": ACCUMULATE,
}

OmegaConf.register_new_resolver("agree_cache_dir", default_cache_dir, replace=True)  # cache_dir's default


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
    cache_dir: Path | None  # parsed feature files (agree.data.feature_cache); None: no cache
    cache_max_bytes: int


def check_rerank(cfg: DictConfig) -> dict[str, Any]:
    """The ``rerank`` keys in range, as ``rank_stages`` arguments."""
    rerank = cfg.rerank
    for stage in rerank.stages:
        require(stage in RERANK_STAGES, "rerank.stages", list(rerank.stages), f"stages are {RERANK_STAGES}")
    for key in ("k", "depth", "max_entities"):
        at_least(cfg, f"rerank.{key}", 1)
    at_least(cfg, "rerank.max_entity_words", 1, "any length")
    require(rerank.absent_rank >= rerank.k, "rerank.absent_rank", rerank.absent_rank, "must be >= rerank.k")
    if "egr" in rerank.stages:
        require(rerank.depth >= rerank.k, "rerank.depth", rerank.depth, f"must be >= rerank.k={rerank.k}")
    plain = OmegaConf.to_container(rerank, resolve=True)
    return {
        "accumulate": plain["accumulate"],
        "stages": plain["stages"],
        "k": plain["k"],
        "depth": plain["depth"],
        "absent_rank": plain["absent_rank"],
        "text_to_image": plain["text_to_image"],
        "image_to_text": plain["image_to_text"],
    }


def check_choices(cfg: DictConfig) -> None:
    """Each key of ``CHOICES`` names one of its choices."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        require(value in choices, key, value, f"choose one of {list(choices)}")


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


CKPT_DATA = ("same", "any")


def data_overrides(source: dict) -> str:
    """The ``data`` overrides that name a ``data_source``: ``data=flickr30k data.root=/data/f30k``."""
    group = "flickr30k" if source["kind"] == "release" else "synthetic"
    prefix = f" data.prefix={source['prefix']}" if source["prefix"] != "flickr30k" else ""
    return f"data={group} data.root={source['root']}{prefix}"


def checkpoint_data(path: Path, cfg: DictConfig) -> dict | None:
    """The training data ``ckpt_path`` records (None for a checkpoint without it), after checking
    that it holds a ``model.name`` model: both from its metadata, its tensors left on disk."""
    from agree.model.clip import DATA_KEY, check_checkpoint_model, read_checkpoint

    checkpoint = read_checkpoint(path, mmap=True)
    check_checkpoint_model(checkpoint, cfg.model.name, path)
    return checkpoint.get(DATA_KEY)


def check_same_data(cfg: DictConfig, trained_on: dict | None) -> None:
    """With ``ckpt_data=same``, the evaluation's data is the one the checkpoint was trained on."""
    if trained_on is None or cfg.ckpt_data == "any":
        return
    current = data_source(cfg.data)
    if current != trained_on:
        size = trained_on["image_size"]
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} was trained on {data_overrides(trained_on)} ({size}-px images), "
            f"this evaluation reads {data_overrides(current)} ({current['image_size']}-px images): add "
            f"{data_overrides(trained_on)} to evaluate it on its test split, or set ckpt_data=any to "
            "evaluate it on other data"
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
    for key, path in {"texts": layout.test_texts, "images": layout.test_images}.items():
        if not annotations[key]:
            require_file(path, "data.root", cfg.data.root, f"set annotations.{key}, or fix data.root")
    if "egr" in cfg.rerank.stages and not from_files and not annotations.text_segs:
        path = layout.test_text_segs
        require_file(
            path,
            "rerank.stages",
            list(cfg.rerank.stages),
            "EGR needs the entities of the test captions: run `python -m agree.prepare entities "
            f"input={layout.test_texts} output={path}`, or set annotations.text_segs=<that file>, or use "
            "rerank=tbr (or none)",
        )
    if not from_files:
        require_file(layout.images_npz("test"), "data.root", cfg.data.root, "fix data.root")


def evaluate_settings(cfg: DictConfig) -> EvaluateSettings:
    """Every check of ``agree.evaluate``'s config, before any work; fills the model's own image size
    and normalisation into ``cfg`` where it leaves them null (when a model or data folder is used)."""
    checked = typed(EvaluateConfig, cfg)
    for key in ("batch_size", "devices"):
        at_least(checked, key, 1)
    check_seed(checked)
    device = check_device(checked.device)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        require(
            checked.devices <= count,
            "devices",
            checked.devices,
            f"one process per GPU, and this machine has {count}; use devices={count} or fewer, "
            "or device=cpu for processes on the CPU",
        )
    rerank = check_rerank(checked)
    check_choices(checked)
    check_feature_files(checked)
    from_files = bool(checked.features.image_jsonl)
    if checked.ckpt_required and not checked.ckpt_path and not from_files:
        raise ConfigError(
            "ckpt_path is not set, and this preset evaluates a fine-tuned model: "
            "give ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    require(
        checked.ckpt_data in CKPT_DATA, "ckpt_data", checked.ckpt_data, f"choose one of {list(CKPT_DATA)}"
    )
    pretrained = trained_on = None
    if not from_files:
        pretrained = (
            str(check_checkpoint(checked.ckpt_path)) if checked.ckpt_path else checked.model.pretrained
        )
        check_model(checked.model, pretrained)
        if checked.ckpt_path:
            trained_on = checkpoint_data(Path(pretrained), checked)
    uses_data = not (from_files and checked.annotations.images and checked.annotations.texts)
    layout = scenes = None
    if uses_data:  # no model, no data folder otherwise
        check_data_group(checked.data)
        resolve_model(cfg)
        checked = typed(EvaluateConfig, cfg, resolve=True)
        check_data_values(checked)
        check_same_data(checked, trained_on)
        check_data_root(checked.data)
        layout, scenes = data_layout(checked.data), scene_config(checked.data)
    check_test_data(checked, None if scenes is not None else layout, from_files)
    if layout is not None and scenes is None and not from_files:
        check_npz_images(layout, checked.model, "test")
    check_entity_counts(checked, layout)
    require(
        checked.cache_max_gb > 0,
        "cache_max_gb",
        checked.cache_max_gb,
        "must be > 0 (cache_dir=null: no cache)",
    )
    return EvaluateSettings(
        cfg=checked,
        output_dir=Path(checked.output_dir),
        from_files=from_files,
        model=None if from_files else model_settings(checked, pretrained),
        layout=layout,
        scenes=scenes,
        device=device,
        rerank=rerank,
        cache_dir=resolve_path(checked.cache_dir) if checked.cache_dir else None,
        cache_max_bytes=int(checked.cache_max_gb * 1e9),
    )
