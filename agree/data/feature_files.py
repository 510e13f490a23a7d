"""Feature files: the release's JSONL interchange and the binary store.

The JSONL files (``{"image_id": "9", "feature": [...]}`` lines) are read with validation and
written; the store is ``NAME.npy`` + ``NAME.ids.json``, memory-mapped on reading.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import ArrayLike

from agree.atomic import atomic_path, write_json, write_npy
from agree.data.fast_feature_rows import fast_feature_row
from agree.data.json_lines import check_fields, check_unique, decode_utf8, json_id, parse_id, show
from agree.data.lines import parsed_lines
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


def _feature_row(line: bytes | memoryview, where: str, id_key: str) -> tuple[str, np.ndarray]:
    """(canonical id, float32 array) of one feature JSONL line; ``where`` locates it in errors.

    Plain rows take the fast path (:mod:`agree.data.fast_feature_rows`); the others are validated.
    """
    return fast_feature_row(line, id_key, where) or _validated_row(line, where, id_key)


def _validated_row(line: bytes | memoryview, where: str, id_key: str) -> tuple[str, np.ndarray]:
    """:func:`_feature_row` through orjson with every check; a bad line raises its one-line error."""
    line = bytes(line)
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        # Python's json also reads NaN/Infinity (which its writer emits) and huge integers: report
        # those as bad values below; anything else fails there as malformed
        try:
            obj = json.loads(decode_utf8(line, where))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataFormatError(f"{where}: JSON nested too deeply") from None
        except ValueError as e:
            raise DataFormatError(f"{where}: {one_line(e)}") from None
    check_fields(obj, {id_key: (int, str), "feature": list}, where)
    array = _number_array(obj["feature"])
    if array is None:
        raise DataFormatError(f"{where}: 'feature' is not a (list of) equal-length number lists")
    if not np.isfinite(array).all():
        raise DataFormatError(
            f"{where}: {id_key} {show(obj[id_key])}: feature contains NaN or infinite values "
            "(or numbers beyond float32)"
        )
    return parse_id(obj[id_key], where, id_key), array


def feature_rows(path: str | os.PathLike, id_key: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """(``file:line``, canonical id, float32 array) of each row of a feature JSONL file, in file order.

    Large files are parsed by several processes (``agree.data.lines``): JSON number parsing is the
    cost of reading these files. They start at this call: call it for each file, then read them.
    """
    if not Path(path).is_file():
        raise DataFormatError(f"{path}: file not found")
    with _reading(path):
        lines = parsed_lines(path, partial(_feature_row, id_key=id_key))
    return _located_rows(path, lines)


def _located_rows(path, lines) -> Iterator[tuple[str, str, np.ndarray]]:
    with _reading(path):
        for where, (key, array) in lines:
            yield where, key, array


@contextlib.contextmanager
def _reading(path) -> Iterator[None]:
    """An ``OSError`` (at the call that starts the parsing, or while reading) as a one-line error."""
    try:
        yield
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({one_line(e)})") from None


def read_feature_jsonl(
    path: str | os.PathLike, id_key: str, rows: Iterator | None = None
) -> tuple[list[str], np.ndarray]:
    """``{"image_id": "9", "feature": [...]}`` lines -> (ids, float32 [N, D]).

    ``rows``: the file's :func:`feature_rows`, when started earlier (default: started here).
    """
    ids, arrays, wheres = [], [], []
    for where, key, array in feature_rows(path, id_key) if rows is None else rows:
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


def read_entity_feature_jsonl(
    path: str | os.PathLike, max_entities: int, rows: Iterator | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``{"query_id": 8, "feature": [[...], ...]}`` lines, a vector per entity -> (ids, [N, E, D], valid).

    ``valid`` [N, E] marks the real slots; ``rows`` as in :func:`read_feature_jsonl`.

    Queries with more than ``max_entities`` vectors keep the first ones; fewer are padded (zeros,
    marked invalid). ``[]`` is a query without entities.
    """
    ids, arrays, wheres, dim = [], [], [], None
    for where, key, array in feature_rows(path, "query_id") if rows is None else rows:
        if array.shape == (0,):
            array = array.reshape(0, dim or 0)
        wrong_width = array.ndim == 2 and len(array) and array.shape[1] != (dim or array.shape[1] or -1)
        if array.ndim != 2 or wrong_width:
            raise DataFormatError(
                f"{where}: entity features of shape {array.shape}, expected (E, {dim or 'D'})"
            )
        dim = dim if dim is not None or not len(array) else array.shape[1]
        ids.append(key)
        arrays.append(array[:max_entities])
        wheres.append(where)
    if not arrays:
        raise DataFormatError(f"{path}: no records")
    check_unique(ids, wheres, "query_id")
    features = np.zeros((len(arrays), max_entities, dim or 0), dtype=np.float32)
    valid = np.zeros((len(arrays), max_entities), dtype=bool)
    for i, array in enumerate(arrays):
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
