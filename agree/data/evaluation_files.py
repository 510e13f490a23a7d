"""The release's evaluation outputs: prediction lines (written and read back) and evaluation JSON."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from agree.data.json_lines import check_fields, check_unique, checked_rows, json_id, parse_id, parse_id_list
from agree.errors import DataFormatError


def prediction_rows(id_key: str, query_ids: list[str], ranked_item_ids: list[list[str]]) -> list[dict]:
    """Prediction lines: ``{"query_id": 8, "item_ids": [...]}`` or ``{"image_id": "9", ...}``.

    Query ids are integers and image ids strings, as in the release; listed items are integers
    when numeric.
    """
    as_key = str if id_key == "image_id" else json_id
    return [
        {id_key: as_key(q), "item_ids": [json_id(i) for i in items]}
        for q, items in zip(query_ids, ranked_item_ids, strict=True)
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
