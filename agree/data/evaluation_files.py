"""An evaluation's output folder: its file names (one description, for ``agree.evaluate`` that writes
them and ``agree.report`` that reads them), the release's prediction lines (written and read back)
and evaluation JSON, and where the report finds the annotations and test images.

    features/             binary feature store (FEATURE_NAMES; entity ones only when a model extracted them)
    predictions/          {stage}_{direction}.jsonl, the release's prediction lines
    evaluation/           {stage}_{direction}.json, the release's evaluation files
    report_inputs.json    see ``report_inputs``
    results.json          recalls per stage and direction, and the binding probe ("probe", when
                          the test captions have entities); written last, it marks a finished evaluation
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numpy.typing import ArrayLike

from agree.atomic import write_json, write_jsonl
from agree.data.feature_files import save_features
from agree.data.json_lines import check_fields, check_unique, checked_rows, json_id, parse_id, parse_id_list
from agree.data.layout import ReleaseLayout
from agree.errors import DataFormatError

FEATURES, PREDICTIONS, EVALUATION = "features", "predictions", "evaluation"
REPORT_INPUTS, RESULTS = "report_inputs.json", "results.json"
PROBE = "probe"  # results.json's key of the binding probe, beside the stages
OUTPUTS = (FEATURES, PREDICTIONS, EVALUATION, REPORT_INPUTS, RESULTS)  # replaced as a set, RESULTS last
# the feature store's entries: texts and images, then the entity slots of each text query
FEATURE_NAMES = ("texts", "images", "entity_prompts", "entity_masks", "entity_valid")
# a direction's prediction lines rank by the id of its queries
QUERY_ID_KEY = {"text_to_image": "query_id", "image_to_text": "image_id"}


@dataclass(frozen=True)
class EvaluationFiles:
    """Where an evaluation's outputs lie under its folder ``root``."""

    root: Path

    @property
    def features(self) -> Path:
        return self.root / FEATURES

    def predictions(self, stage: str, direction: str) -> Path:
        return self.root / PREDICTIONS / f"{stage}_{direction}.jsonl"

    def evaluation(self, stage: str, direction: str) -> Path:
        return self.root / EVALUATION / f"{stage}_{direction}.json"

    @property
    def report_inputs(self) -> Path:
        return self.root / REPORT_INPUTS

    @property
    def results(self) -> Path:
        return self.root / RESULTS


def stage_results(results: dict) -> dict:
    """The stage blocks of ``results.json`` (``raw``, ``egr``, ``tbr``, in order), the probe left out."""
    return {stage: block for stage, block in results.items() if stage != PROBE}


def report_inputs(texts_file: Path, images_file: Path, layout: ReleaseLayout | None) -> dict:
    """Where ``agree.report`` finds the ground truth and the test images (absolute paths; no npz: None)."""
    npz = layout.images_npz("test") if layout is not None else None
    return {
        "texts": str(texts_file),
        "images": str(images_file),
        "images_npz": str(npz) if npz is not None and npz.is_file() else None,
        "image_size": layout.image_size if layout is not None else None,
        "mean": list(layout.mean) if layout is not None else None,
        "std": list(layout.std) if layout is not None else None,
    }


def write_evaluation(
    files: EvaluationFiles,
    ids: Mapping[str, list[str]],
    features: Mapping[str, ArrayLike],
    lists: Mapping[str, Mapping[str, Any]],
    results: dict,
    inputs: dict,
) -> None:
    """Write every output of an evaluation under ``files.root`` (a staging folder), results last.

    ``ids``: ``"texts"`` (query ids) and ``"images"`` (image ids), in annotation order;
    ``features``: store entries by name (``FEATURE_NAMES``), one row per query or image;
    ``lists``: per stage and direction, ranked item indices [Q, k] (-1: none; ``.tolist()``);
    ``results``: per stage and direction the recalls, and ``"rsum"``; ``"probe"``: see ``agree.evaluate``.
    """
    for name, rows in features.items():
        save_features(files.features, name, ids["images" if name == "images" else "texts"], rows)
    queries = {"text_to_image": ids["texts"], "image_to_text": ids["images"]}
    items = {"text_to_image": ids["images"], "image_to_text": ids["texts"]}
    for stage, ranked in lists.items():
        for direction, rows in ranked.items():
            lines = prediction_rows(
                QUERY_ID_KEY[direction], queries[direction], items[direction], rows.tolist()
            )
            write_jsonl(files.predictions(stage, direction), lines)
            write_json(files.evaluation(stage, direction), evaluation_json(results[stage][direction]))
    write_json(files.report_inputs, inputs)
    write_json(files.results, results)


def prediction_rows(
    id_key: str, query_ids: list[str], item_ids: list[str], ranked: list[list[int]]
) -> list[dict]:
    """Prediction lines: ``{"query_id": 8, "item_ids": [...]}`` or ``{"image_id": "9", ...}``.

    ``ranked``: per query, indices into ``item_ids`` best first (-1: none, left out). Query ids are
    integers and image ids strings, as in the release; listed items are integers when numeric.
    """
    as_key = str if id_key == "image_id" else json_id
    items = [json_id(i) for i in item_ids]  # each gallery id recurs in many lists: converted once
    return [
        {id_key: as_key(q), "item_ids": [items[i] for i in row if i >= 0]}
        for q, row in zip(query_ids, ranked, strict=True)
    ]


def evaluation_json(recall: dict[str, float]) -> dict:
    """The release's evaluation file for one direction, from ``{"r1", "r5", "r10", "mean_recall"}``."""
    score = recall["mean_recall"]
    return {
        "success": True,
        "score": score,
        "scoreJson": {
            "score": score,
            "mean_recall": score,
            "r1": recall["r1"],
            "r5": recall["r5"],
            "r10": recall["r10"],
        },
    }


@dataclass(frozen=True)
class Prediction:
    """One line of a prediction file: a query and its ranked items (canonical ids)."""

    query_id: str
    item_ids: tuple[str, ...]


def _ranked_item(item: Any) -> Any:
    """An item of ``item_ids``: an id, or a list whose first element is the id (``[id, score]``)."""
    return item[0] if isinstance(item, list) and item else item


def read_predictions(path: str | os.PathLike) -> tuple[str, list[Prediction]]:
    """A prediction file (``prediction_rows`` format) -> (its id key, the lines in file order).

    Every line uses the same id key (``query_id`` for text queries, ``image_id`` for image
    queries); query ids are unique, and no item appears twice in one ranking.
    """
    rows = checked_rows(path, {"item_ids": list})
    id_key = next((key for key in ("query_id", "image_id") if key in rows[0][1]), None)
    if id_key is None:
        raise DataFormatError(f"{rows[0][0]}: missing key 'query_id' or 'image_id'")
    out = []
    for where, row in rows:
        check_fields(row, {id_key: (int, str)}, where)
        other = "image_id" if id_key == "query_id" else "query_id"
        if other in row:
            raise DataFormatError(f"{where}: both 'query_id' and 'image_id'; a line ranks one query")
        items = parse_id_list([_ranked_item(i) for i in row["item_ids"]], where, "item_ids")
        check_unique(items, [where] * len(items), "item in 'item_ids':")
        out.append(Prediction(parse_id(row[id_key], where, id_key), tuple(items)))
    check_unique([p.query_id for p in out], [where for where, _ in rows], id_key)
    return id_key, out
