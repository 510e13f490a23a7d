"""Evaluate image-text retrieval on the test split, with optional re-ranking.

    python -m agree.evaluate ckpt_path=outputs/train/.../checkpoints/last.ckpt [rerank=egr_tbr]

Features come from a model (a checkpoint or ``model.pretrained``) or from reference JSONL
feature files (``features.*``). Writes under ``output_dir``: ``features/`` (binary feature
store), ``predictions/`` (reference JSONL per stage and direction), ``evaluation/`` (reference
evaluation JSON per stage and direction), ``results.json`` and ``report_inputs.json`` (where
``agree.report`` finds the annotations and test images). They are written into a hidden staging
folder first and replace an earlier evaluation's outputs as a set (``agree.atomic.replace_as_set``).

The output files are described in ``agree.data.evaluation_files``; features are extracted by
``agree.retrieval.extraction``, which imports model, dataset and Lightning code only when it
extracts, so an evaluation from feature files starts without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from agree.atomic import replace_as_set, staging_dir
from agree.checks import check_data_root, check_evaluate_config
from agree.cli import user_errors
from agree.config import ensure_data, resolve_device, resolve_path
from agree.data.evaluation_files import OUTPUTS, RESULTS, EvaluationFiles, report_inputs, write_evaluation
from agree.data.records import TestImage, TestText, read_test_images, read_test_texts, read_text_segs
from agree.errors import ConfigError
from agree.folders import check_entries, claim_entries
from agree.report.table import format_table
from agree.retrieval.extraction import jsonl_features, model_features
from agree.retrieval.ground_truth import ground_truth
from agree.retrieval.metrics import DIRECTIONS, recall_at_k, summarise
from agree.retrieval.pipeline import EntityFeatures, rank_stages


@dataclass
class TestSet:
    """The test annotations and the features of their texts and images (rows in file order)."""

    texts: list[TestText]
    images: list[TestImage]
    positives: dict[str, torch.Tensor]  # per direction, padded item indices (see ground_truth)
    text_features: torch.Tensor
    image_features: torch.Tensor
    entities: EntityFeatures | None = None
    report_inputs: dict | None = None  # see report_inputs()


def check_config(cfg: DictConfig) -> None:
    """Incompatible or missing settings fail before any work, naming the key."""
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
    _check_entity_counts(cfg)
    if isinstance(cfg.devices, bool) or not isinstance(cfg.devices, int) or cfg.devices < 1:
        raise ConfigError(f"devices={cfg.devices}: the number of extraction processes, an integer >= 1")
    check_evaluate_config(cfg)


def _check_entity_counts(cfg: DictConfig) -> None:
    """``features.mask_padding`` on JSONL entity features needs each query's entity count (text_segs)."""
    f = cfg.features
    if not (f.image_jsonl and "egr" in cfg.rerank.stages and f.mask_padding) or cfg.annotations.text_segs:
        return
    uses_data_root = not (cfg.annotations.images and cfg.annotations.texts)
    layout = check_data_root(cfg.data) if uses_data_root else None
    if uses_data_root and (layout is None or layout.test_text_segs.is_file()):
        return  # generated data (which has its text_segs), or the file under data.root
    raise ConfigError(
        "features.mask_padding=true needs each query's entity count: set annotations.text_segs="
        "<flickr30k_test_texts_segs.jsonl>, or features.mask_padding=false (method=reference) to "
        "score all 10 vectors as the release does"
    )


def load_test_set(cfg: DictConfig) -> TestSet:
    """Annotations, ground-truth checks, and features (from a model or from JSONL files)."""
    check_config(cfg)
    from_files = bool(cfg.features.image_jsonl)
    a = cfg.annotations
    layout = None if from_files and a.images and a.texts else ensure_data(cfg.data)
    texts_file = resolve_path(a.texts) if a.texts else layout.test_texts
    images_file = resolve_path(a.images) if a.images else layout.test_images
    texts, images = read_test_texts(texts_file), read_test_images(images_file)
    positives = ground_truth(texts, images, (texts_file, images_file))  # fails early on inconsistent ids
    inputs = report_inputs(texts_file, images_file, layout)
    segs = None
    if "egr" in cfg.rerank.stages and (not from_files or cfg.features.mask_padding):
        segs = read_text_segs(resolve_path(a.text_segs) if a.text_segs else layout.test_text_segs)
    if from_files:
        features = jsonl_features(cfg, texts, images, segs)
        return TestSet(texts, images, positives, *features, report_inputs=inputs)
    features = model_features(cfg, texts, images, segs, layout)
    return TestSet(texts, images, positives, *features, report_inputs=inputs)


def evaluate(cfg: DictConfig) -> dict:
    """Extract (or read) features, rank and re-rank both directions, score, write every output."""
    target = Path(cfg.output_dir)
    check_entries(target, "evaluate", OUTPUTS)  # before any work: never replace a user's features/ ...
    data = load_test_set(cfg)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return {}  # extraction over several processes: the first one ranks and writes
    lists, results = rank_and_score(cfg, data)
    claim_entries(target, "evaluate", OUTPUTS)
    out = staging_dir(target, "evaluate")  # the outputs replace an earlier evaluation's as a set
    ids = {"texts": [t.query_id for t in data.texts], "images": [im.image_id for im in data.images]}
    write_evaluation(EvaluationFiles(out), ids, stored_features(data), lists, results, data.report_inputs)
    replace_as_set(out, target, OUTPUTS, last=RESULTS)
    return results


def rank_and_score(cfg: DictConfig, data: TestSet) -> tuple[dict, dict]:
    """(ranked lists, results) of every stage of ``cfg.rerank`` in both directions, on ``cfg.device``."""
    device = resolve_device(cfg.device)
    r = cfg.rerank
    entities = data.entities
    if entities is not None:
        entities = EntityFeatures(
            entities.prompts.to(device), entities.masks.to(device), entities.valid.to(device)
        )
    lists = rank_stages(
        data.text_features.to(device),
        data.image_features.to(device),
        list(r.stages),
        r.k,
        entities,
        depth=r.get("depth", 128),
        absent_rank=r.get("absent_rank", 10000),
        text_to_image=OmegaConf.to_container(r.text_to_image) if "text_to_image" in r else None,
        image_to_text=OmegaConf.to_container(r.image_to_text) if "image_to_text" in r else None,
    )
    results = {
        stage: summarise(*(recall_at_k(ranked[d].cpu(), data.positives[d]) for d in DIRECTIONS))
        for stage, ranked in lists.items()
    }
    return lists, results


def stored_features(data: TestSet) -> dict[str, torch.Tensor]:
    """The feature store's entries (``FEATURE_NAMES``) of a test set."""
    stored = {"images": data.image_features, "texts": data.text_features}
    if data.entities is not None:
        e = data.entities
        stored.update(entity_prompts=e.prompts, entity_masks=e.masks, entity_valid=e.valid.float())
    return stored


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        results = evaluate(cfg)
    if not results:  # another process of a multi-process extraction
        return None
    print(format_table(results))
    print(f"results: {EvaluationFiles(Path(cfg.output_dir)).results}")
    return results[list(results)[-1]]["rsum"]


if __name__ == "__main__":
    main()
