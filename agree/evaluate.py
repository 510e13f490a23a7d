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

import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from agree.atomic import replace_as_set, staging_dir
from agree.cli import freeze_imports, user_errors
from agree.config import ensure_data
from agree.data.evaluation_files import OUTPUTS, RESULTS, EvaluationFiles, report_inputs, write_evaluation
from agree.data.feature_cache import FeatureCache
from agree.data.layout import resolve_path
from agree.data.records import TestImage, TestText, read_test_images, read_test_texts, read_text_segs
from agree.folders import check_entries, claim_entries
from agree.report.table import format_table
from agree.retrieval.extraction import jsonl_features, model_features
from agree.retrieval.ground_truth import ground_truth
from agree.retrieval.metrics import DIRECTIONS, recall_at_k, summarise
from agree.retrieval.pipeline import EntityFeatures, rank_stages
from agree.settings import EvaluateSettings, evaluate_settings
from agree.workers import die_with_parent


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


def check_config(cfg: DictConfig) -> EvaluateSettings:
    """Incompatible or missing settings fail before any work, naming the key (``agree.settings``)."""
    return evaluate_settings(cfg)


def open_cache(settings: EvaluateSettings) -> FeatureCache:
    """The cache of parsed feature files (``cache_dir``), emptied first when ``cache_clear``."""
    cache = FeatureCache.open(settings.cache_dir, settings.cache_max_bytes)
    if settings.cfg.cache_clear and cache.folder is not None:
        print(f"cache_clear: removed {cache.clear()} entries of {cache.folder}", file=sys.stderr)
    return cache


def load_test_set(
    cfg: DictConfig, settings: EvaluateSettings | None = None, cache: FeatureCache | None = None
) -> TestSet:
    """Annotations, ground-truth checks, and features (from a model, or from JSONL files read
    through ``cache``, default: :func:`open_cache`)."""
    settings = settings or check_config(cfg)
    from_files = settings.from_files
    a = cfg.annotations
    layout = None if settings.layout is None else ensure_data(settings.cfg.data)
    texts_file = resolve_path(a.texts) if a.texts else layout.test_texts
    images_file = resolve_path(a.images) if a.images else layout.test_images
    texts, images = read_test_texts(texts_file), read_test_images(images_file)
    positives = ground_truth(texts, images, (texts_file, images_file))  # fails early on inconsistent ids
    inputs = report_inputs(texts_file, images_file, layout)
    segs = None
    if "egr" in cfg.rerank.stages and (not from_files or cfg.features.mask_padding):
        segs = read_text_segs(resolve_path(a.text_segs) if a.text_segs else layout.test_text_segs)
    if from_files:
        features = jsonl_features(cfg, texts, images, segs, cache or open_cache(settings))
        return TestSet(texts, images, positives, *features, report_inputs=inputs)
    features = model_features(cfg, texts, images, segs, layout, settings.model.pretrained, settings.device)
    return TestSet(texts, images, positives, *features, report_inputs=inputs)


def evaluate(cfg: DictConfig) -> dict:
    """Extract (or read) features, rank and re-rank both directions, score, write every output."""
    settings = check_config(cfg)
    target = settings.output_dir
    check_entries(target, "evaluate", OUTPUTS)  # before any work: never replace a user's features/ ...
    cache = open_cache(settings) if settings.from_files or cfg.cache_clear else None
    data = load_test_set(cfg, settings, cache)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return {}  # extraction over several processes: the first one ranks and writes
    lists, results = rank_and_score(settings, data)
    claim_entries(target, "evaluate", OUTPUTS)
    out = staging_dir(target, "evaluate")  # the outputs replace an earlier evaluation's as a set
    ids = {"texts": [t.query_id for t in data.texts], "images": [im.image_id for im in data.images]}
    stored = stored_features(data, extracted=not settings.from_files)
    write_evaluation(EvaluationFiles(out), ids, stored, lists, results, data.report_inputs)
    replace_as_set(out, target, OUTPUTS, last=RESULTS)
    return results


def rank_and_score(settings: EvaluateSettings, data: TestSet) -> tuple[dict, dict]:
    """(ranked lists, results) of every stage of ``rerank`` in both directions, on ``device``."""
    device, r = settings.device, settings.rerank
    entities = data.entities
    if entities is not None:
        entities = EntityFeatures(
            entities.prompts.to(device), entities.masks.to(device), entities.valid.to(device)
        )
    lists = rank_stages(
        data.text_features.to(device),
        data.image_features.to(device),
        r["stages"],
        r["k"],
        entities,
        depth=r["depth"],
        absent_rank=r["absent_rank"],
        text_to_image=r["text_to_image"],
        image_to_text=r["image_to_text"],
    )
    results = {
        stage: summarise(*(recall_at_k(ranked[d].cpu(), data.positives[d]) for d in DIRECTIONS))
        for stage, ranked in lists.items()
    }
    return lists, results


def stored_features(data: TestSet, extracted: bool) -> dict[str, torch.Tensor]:
    """The feature store's entries (``FEATURE_NAMES``) of a test set: texts and images (the report
    reads them), and the entity slots when a model ``extracted`` them. Entity features read from
    JSONL files stay there: copying them would write 300 MB of the user's own input at Flickr30k size.
    """
    stored = {"images": data.image_features, "texts": data.text_features}
    if extracted and data.entities is not None:
        e = data.entities
        stored.update(entity_prompts=e.prompts, entity_masks=e.masks, entity_valid=e.valid.float())
    return stored


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    freeze_imports()
    die_with_parent()  # loader workers end with the command, however it ends
    with user_errors():
        results = evaluate(cfg)
    if not results:  # another process of a multi-process extraction
        return None
    print(format_table(results))
    print(f"results: {EvaluationFiles(Path(cfg.output_dir)).results}")
    return results[list(results)[-1]]["rsum"]


if __name__ == "__main__":
    main()
