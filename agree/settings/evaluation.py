"""The settings of ``agree.evaluate``: features (model or files), layout, device, re-ranking, checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from agree.config import data_layout, generated, resolve_model, scene_config
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
        at_least(checked, key, 1)
    device = check_device(checked.device)
    rerank = check_rerank(checked)
    check_choices(checked)
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
