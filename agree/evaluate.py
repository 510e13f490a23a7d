"""Evaluate image-text retrieval on the test split, with optional re-ranking.

    python -m agree.evaluate ckpt_path=outputs/train/.../checkpoints/last.ckpt [rerank=egr_tbr]

Features come from a model (a checkpoint or ``model.pretrained``) or from reference JSONL
feature files (``features.*``). Writes under ``output_dir``: ``features/`` (binary feature
store), ``predictions/`` (reference JSONL per stage and direction), ``evaluation/`` (reference
evaluation JSON per stage and direction), ``results.json`` and ``report_inputs.json`` (where
``agree.report`` finds the annotations and test images). They are written into a hidden staging
folder first and replace an earlier evaluation's outputs as a set (``agree.atomic.replace_as_set``).
With test entities (the segs file) and a model, ``results.json`` also holds the binding probe
(``agree.retrieval.probe``).

The output files are described in ``agree.data.evaluation_files``; features are extracted by
``agree.retrieval.extraction``, which imports model, dataset and Lightning code only when it
extracts, so an evaluation from feature files starts without loading it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agree.atomic import replace_as_set, staging_dir
from agree.cli import freeze_imports, user_errors
from agree.config import ensure_data, restores_torch_flags
from agree.console import quiet_libraries
from agree.data.evaluation_files import (
    OUTPUTS,
    PROBE,
    RESULTS,
    EvaluationFiles,
    report_inputs,
    stage_results,
    write_evaluation,
)
from agree.data.feature_cache import FeatureCache
from agree.data.layout import ReleaseLayout, resolve_path
from agree.data.npz_images import NpzImages
from agree.data.records import (
    TestImage,
    TestText,
    read_test_images,
    read_test_texts,
    read_text_seg_rows,
    read_text_segs,
)
from agree.report.table import format_table
from agree.retrieval.entity_rows import (
    listing_order,
    match_rows,
    rows_by_id,
    segs_entity_texts,
    select_rows,
    used_rows,
)
from agree.retrieval.extraction import jsonl_features, model_features
from agree.retrieval.ground_truth import ground_truth
from agree.retrieval.metrics import DIRECTIONS, recall_at_k, summarise
from agree.retrieval.pipeline import RankInputs, rank_in_order
from agree.retrieval.probe import SwapFeatures, swap_accuracy
from agree.runfolder import RECORD, HydraRun, data_roots, output_folders
from agree.settings import EvaluateSettings, evaluate_settings
from agree.workers import die_with_parent

# what an evaluation writes into its output_dir: make clean may delete them in the demo's (agree.folders)
CONTENTS = (*OUTPUTS, *(f"{name}/*" for name in OUTPUTS), f"{RECORD}/*", "*.log")


@dataclass
class TestSet:
    """The test annotations and the features of their texts and images (rows in file order)."""

    texts: list[TestText]
    images: list[TestImage]
    positives: dict[str, torch.Tensor]  # per direction, padded item indices (see ground_truth)
    features: RankInputs
    report_inputs: dict | None = None  # see report_inputs()
    swaps: SwapFeatures | None = None  # the binding probe's swapped captions


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
    segs_file = resolve_path(a.text_segs) if a.text_segs else layout and layout.test_text_segs
    egr_segs = None  # the entities of each caption: EGR on a model's features, or their count
    if "egr" in cfg.rerank.stages and (not from_files or cfg.features.mask_padding):
        egr_segs = segs_file
    if from_files:
        segs = None if egr_segs is None else read_text_segs(egr_segs)
        features = jsonl_features(cfg, texts, images, segs, cache or open_cache(settings))
        return TestSet(texts, images, positives, features, inputs)
    # the binding probe encodes swapped captions: a model, and test entities (a segs file, given or present)
    probe = cfg.probe and segs_file is not None and (a.text_segs or segs_file.is_file())
    probe_segs = read_text_segs(segs_file) if probe else None
    pretrained, device = settings.model.pretrained, settings.device
    # the checked config: it holds every key's default (the test entity rule of the probe, rerank=none)
    features, swaps = model_inputs(
        settings.cfg, texts, images, layout, egr_segs, probe_segs, pretrained, device
    )
    return TestSet(texts, images, positives, features, inputs, swaps)


def model_inputs(
    cfg: DictConfig,
    texts: list[TestText],
    images: list[TestImage],
    layout: ReleaseLayout,
    segs_file: Path | None,
    probe_segs: dict[str, list[str]] | None,
    pretrained: str | None,
    device: torch.device,
) -> tuple[RankInputs, SwapFeatures | None]:
    """Features from the model (``model_features``): with ``segs_file`` (EGR), the entity features
    of its lines, those some caption takes (``features.caption_entities``,
    ``agree.retrieval.entity_rows``); with ``probe_segs``, the binding probe's swapped captions."""
    f = cfg.features
    entity_rows = None
    if segs_file is not None:
        segs = read_text_seg_rows(segs_file, f.masked_text_source == "text_segs")
        positions = np.arange(len(texts)) if f.caption_entities == "by_position" else None
        t2i, i2t = match_rows([r.query_id for r in segs], [t.query_id for t in texts], positions, segs_file)
        lines, (t2i, i2t) = used_rows(t2i, i2t)
        entity_rows = segs_entity_texts([segs[i] for i in lines], texts, f.masked_text_source)
    text_features, image_features, entities, swaps = model_features(
        cfg, texts, images, entity_rows, layout, pretrained, device, probe_segs
    )
    inputs = RankInputs(text_features, image_features)
    if entities is not None:
        inputs.entities = select_rows(entities, t2i)
        inputs.caption_entities = None if np.array_equal(t2i, i2t) else select_rows(entities, i2t)
    if f.gallery_order == "files":  # the release lists the test images in the order of the npz's arrays
        keys = NpzImages(layout.images_npz("test"), layout.image_size).keys()
        inputs.image_order = listing_order(rows_by_id(keys, [im.image_id for im in images]))
    return inputs, swaps


@restores_torch_flags
def evaluate(cfg: DictConfig, run: HydraRun | None = None) -> dict:
    """Extract (or read) features, rank and re-rank both directions, score, write every output.

    ``run``: the ``@hydra.main`` run, whose folder is checked, locked and claimed too; its record
    (``.hydra/``) is written with the outputs, as part of their set when it is the same folder.

    Global torch flags it sets are restored when it returns (``config.torch_flags``).
    """
    settings = check_config(cfg)
    target = settings.output_dir
    folders = {"output_dir": target} if run is None else {"hydra.run.dir": run.folder, "output_dir": target}
    with output_folders("evaluate", folders, data_roots(settings.cfg), run):
        cache = open_cache(settings) if settings.from_files or cfg.cache_clear else None
        data = load_test_set(cfg, settings, cache)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return {}  # extraction over several processes: the first one ranks and writes
        lists, results = rank_and_score(settings, data)
        if data.swaps is not None:
            f = data.features
            results[PROBE] = swap_accuracy(f.images, f.texts, data.swaps, data.positives["text_to_image"])
        out = staging_dir(target, "evaluate")  # the outputs replace an earlier evaluation's as a set
        ids = {"texts": [t.query_id for t in data.texts], "images": [im.image_id for im in data.images]}
        stored = stored_features(data, extracted=not settings.from_files)
        write_evaluation(EvaluationFiles(out), ids, stored, lists, results, data.report_inputs)
        names = OUTPUTS
        if run is not None and run.folder.resolve() == target.resolve():
            run.write_record(out)
            names = (RECORD, *OUTPUTS)
        elif run is not None:
            run.write_record()
        replace_as_set(out, target, names, last=RESULTS)
    return results


def rank_and_score(settings: EvaluateSettings, data: TestSet) -> tuple[dict, dict]:
    """(ranked lists, results) of every stage of ``rerank`` in both directions, on ``device``."""
    lists = rank_in_order(data.features.to(settings.device), **settings.rerank)
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
    stored = {"images": data.features.images, "texts": data.features.texts}
    if extracted and data.features.entities is not None:
        e = data.features.entities
        stored.update(entity_prompts=e.prompts, entity_masks=e.masks, entity_valid=e.valid.float())
    return stored


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    freeze_imports()
    quiet_libraries()
    run = HydraRun.of(cfg)  # before evaluate() fills in the model's defaults: the record is the command's
    die_with_parent()  # loader workers end with the command, however it ends
    with user_errors():
        results = evaluate(cfg, run)
    if not results:  # another process of a multi-process extraction
        return None
    print(format_table(results))
    print(f"results: {EvaluationFiles(Path(cfg.output_dir)).results}")
    stages = stage_results(results)
    return stages[list(stages)[-1]]["rsum"]


if __name__ == "__main__":
    main()
