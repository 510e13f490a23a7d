"""Readers (with validation) for every file format of the reference release (SPEC §4).

Everything downstream reads data through these functions, whether the files come from the
release, from ``agree.data.synthetic`` or from data preparation. A bad file raises
:class:`DataFormatError` with one line naming the file, the line or key, and what is wrong.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agree.io import atomic_path

PROMPT_TEMPLATE = "a photo containing {entity}"
NO_GROUNDING_LABEL = "object"


class DataFormatError(ValueError):
    """A data file is malformed; the message is one line: ``file[:line]: what is wrong``."""


def canonical_id(value: Any) -> str:
    """Ids are compared as integers when numeric ("0042" == 42), else as strings."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not an id")
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return str(int(text)) if text.isdigit() else text


# ---------------------------------------------------------------------------------------------
# JSON / JSON lines


def _check_fields(obj: Any, fields: dict[str, type | tuple[type, ...]], where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, kind in fields.items():
        if key not in obj:
            raise DataFormatError(f"{where}: missing key {key!r} (keys present: {sorted(obj)})")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise DataFormatError(f"{where}: key {key!r} should be {names}, got {type(value).__name__}")
    return obj


def read_jsonl(path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Read a JSON-lines file; every line must be an object holding ``fields`` with those types."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            rows.append(_check_fields(obj, fields, where))
    if not rows:
        raise DataFormatError(f"{path}: no records")
    return rows


def read_json(path: str | os.PathLike) -> Any:
    """Read one JSON document with a one-line error on failure."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def _string_list(value: Any, where: str, key: str) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"{where}: {key!r} must be a list of strings")
    return list(value)


def _id_list(value: Any, where: str, key: str) -> list[str]:
    try:
        return [canonical_id(v) for v in value]
    except TypeError:
        raise DataFormatError(f"{where}: {key!r} must be a list of ids") from None


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


def read_train_records(path: str | os.PathLike) -> list[TrainRecord]:
    rows = read_jsonl(path, {"image": str, "caption": str, "image_id": (int, str)})
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}:{number}"
        segs = _string_list(row.get("segs", []), where, "segs")
        preds = []
        for pred in row.get("preds", []):
            if not (isinstance(pred, dict) and len(pred) == 1):
                raise DataFormatError(f"{where}: each of 'preds' must be a one-key object {{label: score}}")
            ((label, score),) = pred.items()
            if not isinstance(score, (int, float)):
                raise DataFormatError(f"{where}: score of grounded entity {label!r} is not a number")
            preds.append((label, float(score)))
        records.append(
            TrainRecord(
                image_key=canonical_id(row["image_id"]),
                flickr_id=flickr_id(row["image"]),
                caption=row["caption"],
                segs=tuple(segs),
                preds=tuple(preds),
            )
        )
    return records


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
        _check_fields(item, {"image": str, "caption": (list, str)}, where)
        captions = [item["caption"]] if isinstance(item["caption"], str) else item["caption"]
        records.append(ValRecord(str(index), tuple(_string_list(captions, where, "caption"))))
    return records


@dataclass(frozen=True)
class TestText:
    query_id: str
    text: str
    image_ids: tuple[str, ...]


def read_test_texts(path: str | os.PathLike) -> list[TestText]:
    rows = read_jsonl(path, {"query_id": (int, str), "query_text": str, "item_ids": list})
    out = [
        TestText(
            canonical_id(r["query_id"]),
            r["query_text"],
            tuple(_id_list(r["item_ids"], f"{path}:{i}", "item_ids")),
        )
        for i, r in enumerate(rows, start=1)
    ]
    _check_unique([t.query_id for t in out], path, "query_id")
    return out


@dataclass(frozen=True)
class TestImage:
    image_id: str
    query_ids: tuple[str, ...]


def read_test_images(path: str | os.PathLike) -> list[TestImage]:
    rows = read_jsonl(path, {"image_id": (int, str), "item_ids": list})
    out = [
        TestImage(canonical_id(r["image_id"]), tuple(_id_list(r["item_ids"], f"{path}:{i}", "item_ids")))
        for i, r in enumerate(rows, start=1)
    ]
    _check_unique([t.image_id for t in out], path, "image_id")
    return out


def read_text_segs(path: str | os.PathLike) -> dict[str, list[str]]:
    """``flickr30k_test_texts_segs.jsonl`` -> {query_id: entities}."""
    rows = read_jsonl(path, {"query_id": (int, str), "items": list})
    return {
        canonical_id(r["query_id"]): _string_list(r["items"], f"{path}:{i}", "items")
        for i, r in enumerate(rows, start=1)
    }


def read_image_objects(path: str | os.PathLike) -> dict[str, list[str]]:
    """``objects/flickr30k_{split}_imgs_objs.jsonl`` -> {flickr_id: VG vocabulary words}."""
    rows = read_jsonl(path, {"image_id": (int, str), "image_objects": list})
    return {
        canonical_id(r["image_id"]): _string_list(r["image_objects"], f"{path}:{i}", "image_objects")
        for i, r in enumerate(rows, start=1)
    }


def read_vg_vocab(path: str | os.PathLike) -> dict[str, list[str]]:
    """``vocab_VG_images_objs.jsonl`` -> {word: VG image ids having a non-empty region of it}."""
    rows = read_jsonl(path, {"vocab": str, "objects": list})
    vocab = {}
    for number, row in enumerate(rows, start=1):
        ids = []
        for obj in row["objects"]:
            _check_fields(obj, {"image_id": (int, str)}, f"{path}:{number}")
            if obj.get("object"):  # the reference skips empty regions
                ids.append(canonical_id(obj["image_id"]))
        vocab[row["vocab"]] = ids
    return vocab


def _check_unique(ids: list[str], path: str | os.PathLike, key: str) -> None:
    seen = set()
    for number, value in enumerate(ids, start=1):
        if value in seen:
            raise DataFormatError(f"{path}:{number}: duplicate {key} {value}")
        seen.add(value)


# ---------------------------------------------------------------------------------------------
# npz image arrays


class NpzImages:
    """Lazy, validated access to an npz of preprocessed images (3×S×S float, CLIP-normalised).

    Keys are matched as ids (``canonical_id``). Each array is checked on access for shape, dtype
    and finiteness. The archive is opened per process, so instances are safe to send to
    DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, image_size: int):
        self.path = Path(path)
        self.shape = (3, image_size, image_size)
        if not self.path.is_file():
            raise DataFormatError(f"{self.path}: file not found")
        try:
            with zipfile.ZipFile(self.path) as z:
                names = [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]
        except zipfile.BadZipFile:
            raise DataFormatError(f"{self.path}: not an npz archive") from None
        self._keys = {canonical_id(n): n for n in names}
        self._archive = None
        self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None, "_pid": None}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Any) -> bool:
        return canonical_id(key) in self._keys

    def require(self, keys: list[str], what: str) -> None:
        """Fail with the first of ``keys`` (named in ``what``) that the archive lacks."""
        for key in keys:
            if canonical_id(key) not in self._keys:
                raise DataFormatError(f"{self.path}: no array for {what} {key!r} ({len(self)} keys present)")

    def __getitem__(self, key: Any) -> np.ndarray:
        name = self._keys.get(canonical_id(key))
        if name is None:
            raise DataFormatError(f"{self.path}: no array for key {key!r}")
        if self._archive is None or self._pid != os.getpid():
            self._archive = np.load(self.path, allow_pickle=False)
            self._pid = os.getpid()
        try:
            array = self._archive[name]
        except ValueError as e:  # object arrays need pickle, which we never allow
            raise DataFormatError(f"{self.path}: key {name!r}: {e}") from None
        if not np.issubdtype(array.dtype, np.floating):
            raise DataFormatError(f"{self.path}: key {name!r}: dtype {array.dtype}, expected a float array")
        if array.shape != self.shape:
            raise DataFormatError(f"{self.path}: key {name!r}: shape {array.shape}, expected {self.shape}")
        if not np.isfinite(array).all():
            raise DataFormatError(f"{self.path}: key {name!r}: contains NaN or infinite values")
        return array


# ---------------------------------------------------------------------------------------------
# the release layout


@dataclass(frozen=True)
class ReleaseLayout:
    """Relative paths of the reference release under a dataset root (and a Visual Genome root)."""

    root: Path
    vg_root: Path
    image_size: int = 224
    prefix: str = "flickr30k"

    def annotation(self, name: str) -> Path:
        return self.root / "annotation" / f"{self.prefix}_{name}"

    @property
    def train_records(self) -> Path:
        return self.annotation("train_pred.jsonl")

    @property
    def val_records(self) -> Path:
        return self.annotation("val.json")

    def images_npz(self, split: str) -> Path:
        return self.annotation(f"{split}_images.npz")

    @property
    def test_texts(self) -> Path:
        return self.annotation("test_texts.jsonl")

    @property
    def test_images(self) -> Path:
        return self.annotation("test_images.jsonl")

    @property
    def test_text_segs(self) -> Path:
        return self.annotation("test_texts_segs.jsonl")

    @property
    def grounding_npz(self) -> Path:
        return self.root / f"{self.prefix}_visual_grounding.{self.image_size}.npz"

    def image_objects(self, split: str) -> Path:
        return self.root / "objects" / f"{self.prefix}_{split}_imgs_objs.jsonl"

    @property
    def vg_images_npz(self) -> Path:
        return self.vg_root / f"VG_images.{self.image_size}.npz"

    @property
    def vg_mask_images_npz(self) -> Path:
        return self.vg_root / f"VG_mask_images.{self.image_size}.npz"

    @property
    def vg_vocab(self) -> Path:
        return self.vg_root / "vocab_VG_images_objs.jsonl"


# ---------------------------------------------------------------------------------------------
# writers of the evaluation outputs


def _json_id(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def prediction_rows(id_key: str, query_ids: list[str], ranked_item_ids: list[list[str]]) -> list[dict]:
    """Prediction lines: ``{"query_id": 8, "item_ids": [...]}`` or ``{"image_id": "9", ...}``.

    Query ids are integers and image ids strings, as in the release; listed items are integers
    when numeric.
    """
    as_key = str if id_key == "image_id" else _json_id
    return [
        {id_key: as_key(q), "item_ids": [_json_id(i) for i in items]}
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


# ---------------------------------------------------------------------------------------------
# feature files (reference JSONL interchange)


def _feature_rows(path: str | os.PathLike, id_key: str):
    """Yield (line number, canonical id, float32 array) of a feature JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                try:  # Python's json writes NaN/Infinity, which orjson rejects: report them as such below
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            _check_fields(obj, {id_key: (int, str), "feature": list}, where)
            try:
                array = np.asarray(obj["feature"], dtype=np.float32)
            except (ValueError, TypeError):
                raise DataFormatError(
                    f"{where}: 'feature' is not a (list of) equal-length number lists"
                ) from None
            if not np.isfinite(array).all():
                raise DataFormatError(
                    f"{where}: {id_key} {obj[id_key]}: feature contains NaN or infinite values"
                )
            yield number, canonical_id(obj[id_key]), array


def read_feature_jsonl(path: str | os.PathLike, id_key: str) -> tuple[list[str], np.ndarray]:
    """``{"image_id": "9", "feature": [...]}`` lines -> (ids, float32 [N, D])."""
    ids, rows = [], []
    for number, key, array in _feature_rows(path, id_key):
        if array.ndim != 1 or (rows and array.shape != rows[0].shape):
            expected = rows[0].shape if rows else "(D,)"
            raise DataFormatError(f"{path}:{number}: feature of shape {array.shape}, expected {expected}")
        ids.append(key)
        rows.append(array)
    if not rows:
        raise DataFormatError(f"{path}: no records")
    _check_unique(ids, path, id_key)
    return ids, np.stack(rows)


def read_entity_feature_jsonl(
    path: str | os.PathLike, max_entities: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``{"query_id": 8, "feature": [[...], ...]}`` lines, a vector per entity -> (ids, [N, E, D], valid).

    ``valid`` [N, E] marks the real slots.

    Queries with more than ``max_entities`` vectors keep the first ones; fewer are padded (zeros,
    marked invalid).
    """
    ids, rows, dim = [], [], None
    for number, key, array in _feature_rows(path, "query_id"):
        if array.size == 0:
            array = array.reshape(0, dim or 0)
        if array.ndim != 2 or (dim is not None and array.shape[1] != dim and len(array)):
            raise DataFormatError(
                f"{path}:{number}: entity features of shape {array.shape}, expected (E, {dim or 'D'})"
            )
        dim = dim if dim is not None or not len(array) else array.shape[1]
        ids.append(key)
        rows.append(array[:max_entities])
    if not rows:
        raise DataFormatError(f"{path}: no records")
    _check_unique(ids, path, "query_id")
    features = np.zeros((len(rows), max_entities, dim or 0), dtype=np.float32)
    valid = np.zeros((len(rows), max_entities), dtype=bool)
    for i, array in enumerate(rows):
        if len(array):
            features[i, : len(array)] = array
            valid[i, : len(array)] = True
    return ids, features, valid


def write_feature_jsonl(
    path: str | os.PathLike,
    id_key: str,
    ids: list[str],
    features: np.ndarray,
    valid: np.ndarray | None = None,
) -> None:
    """Write features in the reference JSONL format (a list of vectors per row when ``valid`` is given)."""
    as_key = str if id_key == "image_id" else _json_id
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i, key in enumerate(ids):
            row = features[i] if valid is None else features[i][valid[i]]
            f.write(
                orjson.dumps({id_key: as_key(key), "feature": row}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
            )
