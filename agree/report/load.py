"""Reading what the report shows: an ``agree.evaluate`` output (results, annotations, features and
ranked lists, through ``agree.data.evaluation_files``) or an ``agree.train`` run's validation history."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agree.data.evaluation_files import QUERY_ID_KEY, EvaluationFiles, read_predictions, stage_results
from agree.data.feature_files import load_features
from agree.data.json_lines import canonical_id
from agree.data.npz_images import NpzImages
from agree.data.records import TestImage, TestText, read_test_images, read_test_texts
from agree.errors import DataFormatError
from agree.retrieval.ground_truth import ground_truth
from agree.retrieval.metrics import DIRECTIONS, SHORT, recall_at_k
from agree.retrieval.search import topk_similarity

CURVE_K = 20  # recall@k curves for k = 1..CURVE_K


class ReportError(DataFormatError):
    """A folder or file the report cannot use; the message names it."""


@dataclass
class Evaluation:
    """What an ``agree.evaluate`` output holds, in annotation order."""

    results: dict
    texts: list[TestText]
    images: list[TestImage]
    positives: dict[str, torch.Tensor]  # per direction, padded item indices
    features: dict[str, torch.Tensor]  # "texts", "images"
    lists: dict[str, dict[str, torch.Tensor]]  # per stage and direction, ranked item indices (-1: none)
    npz: NpzImages | None
    normalisation: dict  # "mean", "std" of the npz images, as recorded by agree.evaluate


def aligned_features(directory: Path, name: str, ids: list[str]) -> torch.Tensor:
    """The stored features of ``name`` in the order of ``ids``; every id must have a row."""
    stored, rows = load_features(directory, name)
    index = {canonical_id(i): n for n, i in enumerate(stored)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise ReportError(
            f"{directory / name}.ids.json: no feature for {missing[0]} ({len(missing)} missing)"
        )
    return torch.from_numpy(np.asarray(rows)[[index[i] for i in ids]])


def read_ranked(path: Path, id_key: str, queries: list[str], items: list[str]) -> torch.Tensor:
    """A prediction file as item indices [Q, longest list] in query order, -1 padded."""
    query_index = {q: n for n, q in enumerate(queries)}
    item_index = {i: n for n, i in enumerate(items)}
    found_key, predictions = read_predictions(path)
    if found_key != id_key:
        raise ReportError(f"{path}: lines rank by {found_key!r}, expected {id_key!r}")
    ranked = {}
    for line, p in enumerate(predictions, start=1):
        unknown = [p.query_id] * (p.query_id not in query_index) + [
            i for i in p.item_ids if i not in item_index
        ]
        if unknown:
            raise ReportError(f"{path}:{line}: id {unknown[0]} is not in the test annotations")
        ranked[query_index[p.query_id]] = [item_index[i] for i in p.item_ids]
    out = torch.full((len(queries), max(map(len, ranked.values()), default=0)), -1, dtype=torch.long)
    for query, row in ranked.items():
        out[query, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def load_evaluation(directory: Path) -> Evaluation:
    """Results, annotations, features and ranked lists of an evaluation output."""
    files = EvaluationFiles(directory)
    inputs_file = files.report_inputs
    if not inputs_file.is_file():
        raise ReportError(f"{inputs_file}: not found (agree.evaluate writes it; evaluate again)")
    inputs = json.loads(inputs_file.read_text())
    annotations = (Path(inputs["texts"]), Path(inputs["images"]))
    texts, images = read_test_texts(annotations[0]), read_test_images(annotations[1])
    query_ids, image_ids = [t.query_id for t in texts], [im.image_id for im in images]
    features = {
        "texts": aligned_features(files.features, "texts", query_ids),
        "images": aligned_features(files.features, "images", image_ids),
    }
    results = json.loads(files.results.read_text())
    lists = {
        "raw": {
            "text_to_image": topk_similarity(features["texts"], features["images"], CURVE_K)[1],
            "image_to_text": topk_similarity(features["images"], features["texts"], CURVE_K)[1],
        }
    }
    names = {"text_to_image": (query_ids, image_ids), "image_to_text": (image_ids, query_ids)}
    for stage in stage_results(results):
        if stage != "raw":
            lists[stage] = {
                d: read_ranked(files.predictions(stage, d), QUERY_ID_KEY[d], *names[d]) for d in DIRECTIONS
            }
    npz_path = inputs.get("images_npz")
    npz = NpzImages(npz_path, inputs["image_size"]) if npz_path and Path(npz_path).is_file() else None
    normalisation = {k: inputs[k] for k in ("mean", "std") if inputs.get(k)}  # older outputs: CLIP's
    return Evaluation(
        results, texts, images, ground_truth(texts, images, annotations), features, lists, npz, normalisation
    )


def recall_curves(ev: Evaluation) -> dict[str, dict[str, list[float]]]:
    """Recall@k (%) for k = 1..min(CURVE_K, list length), per stage and direction."""
    curves = {}
    for stage, lists in ev.lists.items():
        curves[stage] = {}
        for d, ranked in lists.items():
            ks = tuple(range(1, min(CURVE_K, ranked.shape[1]) + 1))
            recall = recall_at_k(ranked, ev.positives[d], ks)
            curves[stage][d] = [recall[f"r{k}"] for k in ks]
    return curves


def validation_history(path: Path) -> list[dict[str, float]]:
    """The rows of a CSVLogger ``metrics.csv`` that hold validation metrics, as numbers."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/rsum")]
    return [
        {k: float(v) for k, v in r.items() if v and (k.startswith("val/") or k in ("step", "epoch"))}
        for r in rows
    ]


def as_results(metrics: dict[str, float]) -> dict:
    """``val/t2i_r1``-style metrics as a results block of ``agree.evaluate``."""
    block = {}
    for d in DIRECTIONS:
        recall = {f"r{k}": metrics[f"val/{SHORT[d]}_r{k}"] for k in (1, 5, 10)}
        block[d] = {**recall, "mean_recall": sum(recall.values()) / 3}
    return {**block, "rsum": metrics["val/rsum"]}
