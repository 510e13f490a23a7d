"""Readers (with validation) for every file format of the reference release (SPEC §4).

Everything downstream reads data through these functions, whether the files come from the
release, from ``agree.data.synthetic`` or from data preparation. A bad file raises
:class:`DataFormatError` with one line naming the file, the line or key, and what is wrong;
no other exception escapes a reader, whatever the bytes (``tests/test_readers_fuzz.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agree.data.lines import parsed_lines
from agree.data.pixels import OPENAI_MEAN, OPENAI_STD
from agree.errors import DataFormatError, one_line
from agree.io import atomic_path

PROMPT_TEMPLATE = "a photo containing {entity}"
NO_GROUNDING_LABEL = "object"


def canonical_id(value: Any) -> str:
    """Ids are compared as integers when numeric ("0042" == 42), else as strings."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"an id is an integer or a string, not {type(value).__name__}")
    if isinstance(value, int):
        return str(value)
    return (value.lstrip("0") or "0") if value.isascii() and value.isdigit() else value


def show(value: Any) -> str:
    """``value`` for a one-line message: as is when printable, else its repr."""
    text = str(value)
    return text if text.isprintable() else repr(text)


SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_name(name: Any, where: str) -> str:
    """``name``, when it is safe as part of a file name (``[A-Za-z0-9_.-]``, no ``..``)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise DataFormatError(
            f"{where}: {show(name)} cannot be part of a file name "
            "(letters, digits, '_', '.' and '-' only, no '..')"
        )
    return name


def valid_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (JSON's ``\\ud800`` escapes give lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str | bytes, where: str, line_in_error: bool = False) -> Any:
    """``json.loads`` with every failure as a one-line DataFormatError (NaN/Infinity are not JSON)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if line_in_error else where
        raise DataFormatError(f"{at}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataFormatError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # NaN/Infinity, integers of thousands of digits, invalid UTF-8
        raise DataFormatError(f"{where}: {one_line(e)}") from None


def _lines(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """(``file:line``, raw line) of each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path}:{number}", line
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({one_line(e)})") from None


def _decode(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{where}: not UTF-8 text (invalid byte at position {e.start})") from None


def _rows(path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]) -> list[tuple[str, dict]]:
    """(``file:line``, object) of every line; each must be an object holding ``fields``."""
    rows = [
        (where, _check_fields(_loads(_decode(line, where), where), fields, where))
        for where, line in _lines(path)
    ]
    if not rows:
        raise DataFormatError(f"{path}: no records")
    return rows


def read_jsonl(path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Read a JSON-lines file; every line must be an object holding ``fields`` with those types."""
    return [row for _, row in _rows(path, fields)]


def read_json(path: str | os.PathLike) -> Any:
    """Read one JSON document with a one-line error on failure."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({one_line(e)})") from None
    return _loads(_decode(raw, str(path)), str(path), line_in_error=True)


def _string_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"{where}: {key!r} must be a list of strings")
    return list(value)


def _id(value: Any, where: str, key: str) -> str:
    try:
        out = canonical_id(value)
    except TypeError:
        raise DataFormatError(f"{where}: {key!r} must be an id (integer or string)") from None
    if not valid_unicode(out):
        raise DataFormatError(f"{where}: {key!r} {show(out)} is not valid Unicode (a lone surrogate escape)")
    return out


def _id_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list):
        raise DataFormatError(f"{where}: {key!r} must be a list of ids")
    return [_id(v, where, key) for v in value]


def _check_unique(ids: list[str], wheres: list[str], key: str) -> None:
    """Fail at the second occurrence of an id; ``wheres[i]`` locates ``ids[i]``."""
    seen = set()
    for value, where in zip(ids, wheres, strict=True):
        if value in seen:
            raise DataFormatError(f"{where}: duplicate {key} {show(value)}")
        seen.add(value)


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


def read_train_records(path: str | os.PathLike) -> list[TrainRecord]:
    return [
        TrainRecord(
            image_key=_id(row["image_id"], where, "image_id"),
            flickr_id=flickr_id(row["image"]),
            caption=row["caption"],
            segs=tuple(_string_list(row.get("segs", []), where, "segs")),
            preds=_grounded(row.get("preds", []), where),
        )
        for where, row in _rows(path, {"image": str, "caption": str, "image_id": (int, str)})
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
    rows = _rows(path, {"query_id": (int, str), "query_text": str, "item_ids": list})
    out = [
        TestText(
            _id(r["query_id"], where, "query_id"),
            r["query_text"],
            tuple(_id_list(r["item_ids"], where, "item_ids")),
        )
        for where, r in rows
    ]
    _check_unique([t.query_id for t in out], [where for where, _ in rows], "query_id")
    return out


@dataclass(frozen=True)
class TestImage:
    image_id: str
    query_ids: tuple[str, ...]


def read_test_images(path: str | os.PathLike) -> list[TestImage]:
    rows = _rows(path, {"image_id": (int, str), "item_ids": list})
    out = [
        TestImage(_id(r["image_id"], where, "image_id"), tuple(_id_list(r["item_ids"], where, "item_ids")))
        for where, r in rows
    ]
    _check_unique([t.image_id for t in out], [where for where, _ in rows], "image_id")
    return out


def _keyed_lists(path: str | os.PathLike, id_key: str, list_key: str) -> dict[str, list[str]]:
    """{id: list of strings} of a JSON-lines file; ids must be unique."""
    rows = _rows(path, {id_key: (int, str), list_key: list})
    ids = [_id(r[id_key], where, id_key) for where, r in rows]
    _check_unique(ids, [where for where, _ in rows], id_key)
    return {
        key: _string_list(r[list_key], where, list_key) for key, (where, r) in zip(ids, rows, strict=True)
    }


def read_text_segs(path: str | os.PathLike) -> dict[str, list[str]]:
    """``flickr30k_test_texts_segs.jsonl`` -> {query_id: entities}."""
    return _keyed_lists(path, "query_id", "items")


def read_image_objects(path: str | os.PathLike) -> dict[str, list[str]]:
    """``objects/flickr30k_{split}_imgs_objs.jsonl`` -> {flickr_id: VG vocabulary words}."""
    return _keyed_lists(path, "image_id", "image_objects")


def read_vg_vocab(path: str | os.PathLike) -> dict[str, list[str]]:
    """``vocab_VG_images_objs.jsonl`` -> {word: VG image ids having a non-empty region of it}."""
    rows = _rows(path, {"vocab": str, "objects": list})
    _check_unique([r["vocab"] for _, r in rows], [where for where, _ in rows], "vocab")
    vocab = {}
    for where, row in rows:
        ids = []
        for obj in row["objects"]:
            _check_fields(obj, {"image_id": (int, str)}, where)
            if obj.get("object"):  # the reference skips empty regions
                ids.append(canonical_id(obj["image_id"]))
        vocab[row["vocab"]] = ids
    return vocab


# ---------------------------------------------------------------------------------------------
# npz image arrays

# what a damaged zip member or npy header raises inside numpy and zipfile
NPZ_ERRORS = (ValueError, OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, RuntimeError)


class NpzImages:
    """Lazy, validated access to an npz of preprocessed images (3×S×S float, CLIP-normalised).

    Keys are matched as ids (``canonical_id``). Each array is checked on access for shape, dtype
    and finiteness. Pickled objects are never loaded. The archive is opened per process, so
    instances are safe to send to DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, image_size: int):
        self.path = Path(path)
        self.shape = (3, image_size, image_size)
        if not self.path.is_file():
            raise DataFormatError(f"{self.path}: file not found")
        try:
            with zipfile.ZipFile(self.path) as z:
                names = [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]
        except NPZ_ERRORS as e:
            raise DataFormatError(f"{self.path}: not an npz archive ({one_line(e)})") from None
        self._keys: dict[str, str] = {}
        for name in names:
            key = canonical_id(name)
            if key in self._keys:
                raise DataFormatError(
                    f"{self.path}: arrays {show(self._keys[key])} and {show(name)} name the same id"
                )
            self._keys[key] = name
        self._archive = None
        self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None, "_pid": None}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Any) -> bool:
        return canonical_id(key) in self._keys

    def keys(self) -> list[str]:
        """The canonical ids of the arrays."""
        return list(self._keys)

    def require(self, keys: list[str], what: str) -> None:
        """Fail with the first of ``keys`` (named in ``what``) that the archive lacks."""
        for key in keys:
            if canonical_id(key) not in self._keys:
                raise DataFormatError(f"{self.path}: no array for {what} {key!r} ({len(self)} keys present)")

    def _load(self, name: str) -> np.ndarray:
        try:
            if self._archive is None or self._pid != os.getpid():
                self._archive = np.load(self.path, allow_pickle=False)
                self._pid = os.getpid()
            return self._archive[name]
        except NPZ_ERRORS as e:  # object arrays need pickle, which we never allow; damaged members
            raise DataFormatError(f"{self.path}: key {name!r}: {one_line(e)}") from None

    def __getitem__(self, key: Any) -> np.ndarray:
        name = self._keys.get(canonical_id(key))
        if name is None:
            raise DataFormatError(f"{self.path}: no array for key {key!r}")
        array = self._load(name)
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
    mean: tuple[float, ...] = OPENAI_MEAN  # the npz images' normalisation: the model's
    std: tuple[float, ...] = OPENAI_STD

    def __post_init__(self) -> None:
        check_name(self.prefix, "prefix")  # it becomes part of every file name

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
    return int(value) if value.isascii() and value.isdigit() else value


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
    rows = _rows(path, {"item_ids": list})
    id_key = next((key for key in ("query_id", "image_id") if key in rows[0][1]), None)
    if id_key is None:
        raise DataFormatError(f"{rows[0][0]}: missing key 'query_id' or 'image_id'")
    out = []
    for where, row in rows:
        _check_fields(row, {id_key: (int, str)}, where)
        other = "image_id" if id_key == "query_id" else "query_id"
        if other in row:
            raise DataFormatError(f"{where}: both 'query_id' and 'image_id'; a line ranks one query")
        items = _id_list([_ranked_item(i) for i in row["item_ids"]], where, "item_ids")
        _check_unique(items, [where] * len(items), "item in 'item_ids':")
        out.append(Prediction(_id(row[id_key], where, id_key), tuple(items)))
    _check_unique([p.query_id for p in out], [where for where, _ in rows], id_key)
    return id_key, out


# ---------------------------------------------------------------------------------------------
# feature files (reference JSONL interchange)


def _number_array(value: Any) -> np.ndarray | None:
    """``value`` (a list, or list of equal-length lists, of JSON numbers) as float32; None if it is not."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    if array.dtype.kind not in "iuf" or array.ndim == 0:
        return None
    with np.errstate(over="ignore"):
        return array.astype(np.float32)


def _feature_row(line: bytes, where: str, id_key: str) -> tuple[str, np.ndarray]:
    """(canonical id, float32 array) of one feature JSONL line; ``where`` locates it in errors."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        # Python's json also reads NaN/Infinity (which its writer emits) and huge integers: report
        # those as bad values below; anything else fails there as malformed
        try:
            obj = json.loads(_decode(line, where))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataFormatError(f"{where}: JSON nested too deeply") from None
        except ValueError as e:
            raise DataFormatError(f"{where}: {one_line(e)}") from None
    _check_fields(obj, {id_key: (int, str), "feature": list}, where)
    array = _number_array(obj["feature"])
    if array is None:
        raise DataFormatError(f"{where}: 'feature' is not a (list of) equal-length number lists")
    if not np.isfinite(array).all():
        raise DataFormatError(
            f"{where}: {id_key} {show(obj[id_key])}: feature contains NaN or infinite values "
            "(or numbers beyond float32)"
        )
    return _id(obj[id_key], where, id_key), array


def _feature_rows(path: str | os.PathLike, id_key: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yield (``file:line``, canonical id, float32 array) of a feature JSONL file, in file order.

    Large files are parsed by several processes (``agree.data.lines``): JSON number parsing is the
    cost of reading these files.
    """
    if not Path(path).is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        for where, (key, array) in parsed_lines(path, partial(_feature_row, id_key=id_key)):
            yield where, key, array
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({one_line(e)})") from None


def read_feature_jsonl(path: str | os.PathLike, id_key: str) -> tuple[list[str], np.ndarray]:
    """``{"image_id": "9", "feature": [...]}`` lines -> (ids, float32 [N, D])."""
    ids, rows, wheres = [], [], []
    for where, key, array in _feature_rows(path, id_key):
        if array.ndim != 1 or not array.size or (rows and array.shape != rows[0].shape):
            expected = rows[0].shape if rows else "(D,) with D > 0"
            raise DataFormatError(f"{where}: feature of shape {array.shape}, expected {expected}")
        ids.append(key)
        rows.append(array)
        wheres.append(where)
    if not rows:
        raise DataFormatError(f"{path}: no records")
    _check_unique(ids, wheres, id_key)
    return ids, np.stack(rows)


def read_entity_feature_jsonl(
    path: str | os.PathLike, max_entities: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``{"query_id": 8, "feature": [[...], ...]}`` lines, a vector per entity -> (ids, [N, E, D], valid).

    ``valid`` [N, E] marks the real slots.

    Queries with more than ``max_entities`` vectors keep the first ones; fewer are padded (zeros,
    marked invalid). ``[]`` is a query without entities.
    """
    ids, rows, wheres, dim = [], [], [], None
    for where, key, array in _feature_rows(path, "query_id"):
        if array.shape == (0,):
            array = array.reshape(0, dim or 0)
        wrong_width = array.ndim == 2 and len(array) and array.shape[1] != (dim or array.shape[1] or -1)
        if array.ndim != 2 or wrong_width:
            raise DataFormatError(
                f"{where}: entity features of shape {array.shape}, expected (E, {dim or 'D'})"
            )
        dim = dim if dim is not None or not len(array) else array.shape[1]
        ids.append(key)
        rows.append(array[:max_entities])
        wheres.append(where)
    if not rows:
        raise DataFormatError(f"{path}: no records")
    _check_unique(ids, wheres, "query_id")
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
