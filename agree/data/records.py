"""Readers of the release's annotation files (SPEC §4): training, validation and test records,
textual entities, object lists and the Visual Genome vocabulary.

Everything downstream reads annotations through these functions, whether the files come from the
release, from ``agree.data.synthetic`` or from data preparation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agree.data.json_lines import (
    canonical_id,
    check_fields,
    check_unique,
    checked_rows,
    parse_id,
    parse_id_list,
    read_json,
    string_list,
)
from agree.errors import DataFormatError

NO_GROUNDING_LABEL = "object"
# The fields of a training line that data preparation adds, what they hold and the command that
# adds them (``{path}``: the train jsonl, ``{root}``: its release folder). A line without a field
# has not been prepared; a present, empty list is a caption without entities.
PREPARED_FIELDS = {
    "segs": ("textual entities", "python -m agree.prepare entities input={path}"),
    "preds": ("grounded entities", "python -m agree.prepare ground root={root} images=<the image folder>"),
}
# The batch inputs of ``datasets.TrainCaptions`` that read a prepared field.
INPUT_FIELDS = {"prompts": "segs", "masked_captions": "segs", "ground_masked": "preds"}


def flickr_id(image_path: str) -> str:
    """``flickr30k-images/10002456.jpg`` -> ``10002456``."""
    return canonical_id(Path(image_path).stem)


@dataclass(frozen=True)
class TrainRecord:
    """One training caption (a line of ``flickr30k_train_pred.jsonl``)."""

    image_key: str  # key in the train images npz (the ``image_id`` integer)
    flickr_id: str  # file stem of ``image``: key of objects and grounding files
    caption: str
    segs: tuple[str, ...]  # textual entities
    preds: tuple[tuple[str, float], ...]  # grounded entities with confidence


def _grounded(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    """The ``preds`` of a training line: one-key objects ``{label: finite score}``."""
    if not isinstance(value, list):
        raise DataFormatError(f"{where}: 'preds' must be a list of one-key objects {{label: score}}")
    preds = []
    for pred in value:
        if not (isinstance(pred, dict) and len(pred) == 1):
            raise DataFormatError(f"{where}: each of 'preds' must be a one-key object {{label: score}}")
        ((label, score),) = pred.items()
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise DataFormatError(f"{where}: score of grounded entity {label!r} is not a number")
        try:
            score = float(score)
        except OverflowError:
            score = math.inf
        if not math.isfinite(score):
            raise DataFormatError(f"{where}: score of grounded entity {label!r} is not finite")
        preds.append((label, score))
    return tuple(preds)


def prepared_fields(inputs: Collection[str]) -> list[str]:
    """The prepared fields (``PREPARED_FIELDS``) that the batch ``inputs`` read, in table order."""
    needed = {INPUT_FIELDS[name] for name in inputs if name in INPUT_FIELDS}
    return [name for name in PREPARED_FIELDS if name in needed]


def how_to_prepare(field: str, path: str | os.PathLike) -> str:
    """``'segs' (the textual entities); run `...```: a prepared field and the command that adds it."""
    what, command = PREPARED_FIELDS[field]
    path = Path(path)
    return f"{field!r} ({what}); run `{command.format(path=path, root=path.parents[1])}`"


def read_train_records(path: str | os.PathLike, required: Collection[str] = ()) -> list[TrainRecord]:
    """The training lines; each must hold the prepared fields in ``required`` (``segs``, ``preds``),
    else absent ones read as empty."""
    rows = checked_rows(path, {"image": str, "caption": str, "image_id": (int, str)})
    for field in required:
        missing = next((where for where, row in rows if field not in row), None)
        if missing is not None:
            raise DataFormatError(f"{missing}: no {how_to_prepare(field, path)}")
    return [
        TrainRecord(
            image_key=parse_id(row["image_id"], where, "image_id"),
            flickr_id=flickr_id(row["image"]),
            caption=row["caption"],
            segs=tuple(string_list(row.get("segs", []), where, "segs")),
            preds=_grounded(row.get("preds", []), where),
        )
        for where, row in rows
    ]


@dataclass(frozen=True)
class ValRecord:
    """One validation image with its captions (an element of ``flickr30k_val.json``)."""

    image_key: str  # key in the val images npz: the element's index
    captions: tuple[str, ...]


def read_val_records(path: str | os.PathLike) -> list[ValRecord]:
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise DataFormatError(f"{path}: expected a non-empty JSON list of {{image, caption}} objects")
    records = []
    for index, item in enumerate(data):
        where = f"{path}: element {index}"
        check_fields(item, {"image": str, "caption": (list, str)}, where)
        captions = [item["caption"]] if isinstance(item["caption"], str) else item["caption"]
        records.append(ValRecord(str(index), tuple(string_list(captions, where, "caption"))))
    return records


@dataclass(frozen=True)
class TestText:
    query_id: str
    text: str
    image_ids: tuple[str, ...]


def read_test_texts(path: str | os.PathLike) -> list[TestText]:
    rows = checked_rows(path, {"query_id": (int, str), "query_text": str, "item_ids": list})
    out = [
        TestText(
            parse_id(r["query_id"], where, "query_id"),
            r["query_text"],
            tuple(parse_id_list(r["item_ids"], where, "item_ids")),
        )
        for where, r in rows
    ]
    check_unique([t.query_id for t in out], [where for where, _ in rows], "query_id")
    return out


@dataclass(frozen=True)
class TestImage:
    image_id: str
    query_ids: tuple[str, ...]


def read_test_images(path: str | os.PathLike) -> list[TestImage]:
    rows = checked_rows(path, {"image_id": (int, str), "item_ids": list})
    out = [
        TestImage(
            parse_id(r["image_id"], where, "image_id"), tuple(parse_id_list(r["item_ids"], where, "item_ids"))
        )
        for where, r in rows
    ]
    check_unique([t.image_id for t in out], [where for where, _ in rows], "image_id")
    return out


def _keyed_lists(path: str | os.PathLike, id_key: str, list_key: str) -> dict[str, list[str]]:
    """{id: list of strings} of a JSON-lines file; ids must be unique."""
    rows = checked_rows(path, {id_key: (int, str), list_key: list})
    ids = [parse_id(r[id_key], where, id_key) for where, r in rows]
    check_unique(ids, [where for where, _ in rows], id_key)
    return {key: string_list(r[list_key], where, list_key) for key, (where, r) in zip(ids, rows, strict=True)}


def read_text_segs(path: str | os.PathLike) -> dict[str, list[str]]:
    """``flickr30k_test_texts_segs.jsonl`` -> {query_id: entities}."""
    return _keyed_lists(path, "query_id", "items")


@dataclass(frozen=True)
class TextSegs:
    """A line of ``flickr30k_test_texts_segs.jsonl``: a caption's entities, and the caption."""

    query_id: str
    text: str  # its query_text ("" when not read)
    items: tuple[str, ...]


def read_text_seg_rows(path: str | os.PathLike, with_text: bool = False) -> list[TextSegs]:
    """``flickr30k_test_texts_segs.jsonl`` in its order; ``with_text``: each line's ``query_text``
    is required and read (the release masks entities in it)."""
    fields = {"query_id": (int, str), "items": list} | ({"query_text": str} if with_text else {})
    rows = checked_rows(path, fields)
    out = [
        TextSegs(
            parse_id(r["query_id"], where, "query_id"),
            r["query_text"] if with_text else "",
            tuple(string_list(r["items"], where, "items")),
        )
        for where, r in rows
    ]
    check_unique([r.query_id for r in out], [where for where, _ in rows], "query_id")
    return out


def read_image_objects(path: str | os.PathLike) -> dict[str, list[str]]:
    """``objects/flickr30k_{split}_imgs_objs.jsonl`` -> {flickr_id: VG vocabulary words}."""
    return _keyed_lists(path, "image_id", "image_objects")


def read_vg_vocab(path: str | os.PathLike) -> dict[str, list[str]]:
    """``vocab_VG_images_objs.jsonl`` -> {word: VG image ids having a non-empty region of it}."""
    rows = checked_rows(path, {"vocab": str, "objects": list})
    check_unique([r["vocab"] for _, r in rows], [where for where, _ in rows], "vocab")
    vocab = {}
    for where, row in rows:
        ids = []
        for obj in row["objects"]:
            check_fields(obj, {"image_id": (int, str)}, where)
            if obj.get("object"):  # the reference skips empty regions
                ids.append(canonical_id(obj["image_id"]))
        vocab[row["vocab"]] = ids
    return vocab
