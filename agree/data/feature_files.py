"""Feature files: the release's JSONL interchange and the binary store.

The JSONL files (``{"image_id": "9", "feature": [...]}`` lines) are read with validation, in this
process, and written; the store is ``NAME.npy`` + ``NAME.ids.json``, memory-mapped on reading.
``agree.data.feature_cache`` keeps the parse of each JSONL file, so that it is parsed once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
from numpy.typing import ArrayLike

from agree.atomic import atomic_path, write_json, write_npy
from agree.data.fast_feature_rows import fast_feature_row
from agree.data.json_lines import (
    check_fields,
    check_unique,
    decode_utf8,
    json_id,
    nonblank_lines,
    parse_id,
    show,
)
from agree.errors import DataFormatError, one_line


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


def _holds_boolean(value: Any) -> bool:
    """Whether a (nested) list holds ``true`` or ``false``, which numpy would read as 1 and 0."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def _feature_row(line: bytes, where: str, id_key: str) -> tuple[str, np.ndarray]:
    """(canonical id, float32 array) of one feature JSONL line; ``where`` locates it in errors.

    Plain rows take the fast path (:mod:`agree.data.fast_feature_rows`); the others are validated.
    """
    return fast_feature_row(line, id_key, where) or _validated_row(line, where, id_key)


def _loads(line: bytes, where: str, id_key: str) -> Any:
    """The JSON value of a line: orjson's, or Python's json's where orjson refuses the line or reads
    the id as a float (orjson reads an integer beyond 64 bits so; Python's json keeps it an integer)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return _python_loads(line, where)
    return _python_loads(line, where) if isinstance(obj, dict) and isinstance(obj.get(id_key), float) else obj


def _python_loads(line: bytes, where: str) -> Any:
    """Python's json, which also reads NaN/Infinity (which its writer emits) and huge integers: those
    are reported as bad values later; anything else fails here as malformed, in one line."""
    text = decode_utf8(line, where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataFormatError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # integers of thousands of digits
        raise DataFormatError(f"{where}: {one_line(e)}") from None


def _validated_row(line: bytes, where: str, id_key: str) -> tuple[str, np.ndarray]:
    """:func:`_feature_row` through orjson with every check; a bad line raises its one-line error."""
    obj = _loads(line, where, id_key)
    check_fields(obj, {id_key: (int, str), "feature": list}, where)
    if (b"true" in line or b"false" in line) and _holds_boolean(obj["feature"]):
        raise DataFormatError(f"{where}: 'feature' holds true/false; features are numbers")
    array = _number_array(obj["feature"])
    if array is None:
        raise DataFormatError(f"{where}: 'feature' is not a (list of) equal-length number lists")
    if not np.isfinite(array).all():
        raise DataFormatError(
            f"{where}: {id_key} {show(obj[id_key])}: feature contains NaN or infinite values "
            "(or numbers beyond float32)"
        )
    return parse_id(obj[id_key], where, id_key), array


def feature_rows(
    path: str | os.PathLike, id_key: str, file: BinaryIO | None = None
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(``file:line``, canonical id, float32 array) of each row of a feature JSONL file, in file order.

    ``file``: an open binary file of ``path`` to read it from (default: opened here). Each line is
    read whole and parsed at once, so a row costs a small multiple of its size in memory.
    """
    for where, line in nonblank_lines(path, file):
        key, array = _feature_row(line, where, id_key)
        yield where, key, array


def read_feature_jsonl(
    path: str | os.PathLike, id_key: str, file: BinaryIO | None = None
) -> tuple[list[str], np.ndarray]:
    """``{"image_id": "9", "feature": [...]}`` lines -> (ids, float32 [N, D]); ``file`` as in
    :func:`feature_rows`."""
    ids, arrays, wheres = [], [], []
    for where, key, array in feature_rows(path, id_key, file):
        if array.ndim != 1 or not array.size or (arrays and array.shape != arrays[0].shape):
            expected = arrays[0].shape if arrays else "(D,) with D > 0"
            raise DataFormatError(f"{where}: feature of shape {array.shape}, expected {expected}")
        ids.append(key)
        arrays.append(array)
        wheres.append(where)
    if not arrays:
        raise DataFormatError(f"{path}: no records")
    check_unique(ids, wheres, id_key)
    return ids, np.stack(arrays)


@dataclass(frozen=True)
class EntityRows:
    """The rows of an entity feature file as read: query i has ``counts[i]`` vectors, rows
    ``sum(counts[:i])`` onwards of ``vectors`` [sum(counts), D]."""

    ids: list[str]
    vectors: np.ndarray
    counts: np.ndarray  # int64 [N]


def parse_entity_feature_jsonl(path: str | os.PathLike, file: BinaryIO | None = None) -> EntityRows:
    """``{"query_id": 8, "feature": [[...], ...]}`` lines, a vector per entity (``[]``: none), every
    vector kept; ``file`` as in :func:`feature_rows`."""
    ids, arrays, wheres, dim = [], [], [], None
    for where, key, array in feature_rows(path, "query_id", file):
        if array.shape == (0,):
            array = array.reshape(0, dim or 0)
        wrong_width = array.ndim == 2 and len(array) and array.shape[1] != (dim or array.shape[1] or -1)
        if array.ndim != 2 or wrong_width:
            raise DataFormatError(
                f"{where}: entity features of shape {array.shape}, expected (E, {dim or 'D'})"
            )
        dim = dim if dim is not None or not len(array) else array.shape[1]
        ids.append(key)
        arrays.append(array)
        wheres.append(where)
    if not arrays:
        raise DataFormatError(f"{path}: no records")
    check_unique(ids, wheres, "query_id")
    vectors = [array for array in arrays if len(array)]
    counts = np.array([len(array) for array in arrays], dtype=np.int64)
    return EntityRows(ids, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32), counts)


def entity_slots(rows: EntityRows, max_entities: int) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, max_entities, D], valid [N, max_entities]) of :class:`EntityRows`: a query's
    first ``max_entities`` vectors; fewer are padded (zeros, marked invalid). When every query has
    exactly ``max_entities`` (the release's files: 10), the features are a view of ``rows.vectors``.
    """
    n, dim = len(rows.counts), rows.vectors.shape[1]
    if (rows.counts == max_entities).all():
        return rows.vectors.reshape(n, max_entities, dim), np.ones((n, max_entities), dtype=bool)
    slot = np.arange(max_entities)
    valid = slot[None, :] < np.minimum(rows.counts, max_entities)[:, None]
    starts = np.cumsum(rows.counts) - rows.counts
    features = np.zeros((n, max_entities, dim), dtype=np.float32)
    features[valid] = rows.vectors[(starts[:, None] + slot[None, :])[valid]]
    return features, valid


def read_entity_feature_jsonl(
    path: str | os.PathLike, max_entities: int, file: BinaryIO | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``{"query_id": 8, "feature": [[...], ...]}`` lines, a vector per entity -> (ids, [N, E, D], valid).

    ``valid`` [N, E] marks the real slots (see :func:`entity_slots`); ``file`` as in
    :func:`feature_rows`. ``[]`` is a query without entities.
    """
    rows = parse_entity_feature_jsonl(path, file)
    return (rows.ids, *entity_slots(rows, max_entities))


def write_feature_jsonl(
    path: str | os.PathLike,
    id_key: str,
    ids: list[str],
    features: np.ndarray,
    valid: np.ndarray | None = None,
) -> None:
    """Write features in the reference JSONL format (a list of vectors per row when ``valid`` is given)."""
    as_key = str if id_key == "image_id" else json_id
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i, key in enumerate(ids):
            row = features[i] if valid is None else features[i][valid[i]]
            f.write(
                orjson.dumps({id_key: as_key(key), "feature": row}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
            )


def save_features(directory: str | os.PathLike, name: str, ids: list[str], features: ArrayLike) -> None:
    """Write ``NAME.npy`` (float32 [N, ...]) and ``NAME.ids.json`` (N ids) atomically."""
    features = np.asarray(features, dtype=np.float32)
    if len(ids) != len(features):
        raise ValueError(f"{name}: {len(ids)} ids for {len(features)} feature rows")
    write_npy(Path(directory) / f"{name}.npy", features)
    write_json(Path(directory) / f"{name}.ids.json", list(ids), indent=None)


def load_features(directory: str | os.PathLike, name: str) -> tuple[list[str], np.ndarray]:
    """The ids and the memory-mapped features of a store entry."""
    directory = Path(directory)
    ids = json.loads((directory / f"{name}.ids.json").read_text())
    features = np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    if len(ids) != len(features):
        raise ValueError(f"{directory / name}: {len(ids)} ids for {len(features)} feature rows")
    return ids, features
