"""Property-based tests of every reader: random, malformed and valid files.

Each reader either returns the right result or raises ``DataFormatError`` with one line that
starts with the file's path (no chained traceback); any other exception, or a read taking over
10 s, fails. Examples per reader (``EXAMPLES``, 12 readers): 120 random byte strings, 120 files
of random JSON values, 100 valid files (round trip: the parse equals what was generated) and 200
damaged valid files (truncated line, wrong-typed or missing field, duplicated id, empty file, huge
number, NaN/Infinity, deep nesting, invalid UTF-8, byte flips; for npz: truncation, byte flips,
non-float, misshapen, NaN or pickled arrays, two keys of one id): 540 per reader, 6,480 in all.
"""

from __future__ import annotations

import contextlib
import json
import signal
import string
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agree.atomic import write_jsonl, write_npz
from agree.data import evaluation_files, feature_files, records
from agree.data.json_lines import canonical_id
from agree.data.npz_images import NpzImages
from agree.errors import DataFormatError

EXAMPLES = {"bytes": 120, "json": 120, "valid": 100, "damaged": 200}


def fuzz(kind: str) -> settings:
    return settings(
        max_examples=EXAMPLES[kind],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


MAX_ENTITIES = 3
IMAGE_SIZE = 2


# ---------------------------------------------------------------------------------------------
# the property


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail instead of hanging."""

    def timeout(*_):
        raise TimeoutError(f"a reader ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read(reader: Callable, path: Path):
    """The reader's result, or None after checking its DataFormatError; any other exception escapes."""
    try:
        with time_limit(10):
            return reader(path)
    except DataFormatError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message, message
        assert message.startswith(str(path)), message
        assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), "chained traceback"
        return None


def read_npz(path: Path) -> dict[str, np.ndarray]:
    images = NpzImages(path, IMAGE_SIZE)
    return {key: np.array(images[key]) for key in images.keys()}


READERS: dict[str, Callable] = {
    "train": records.read_train_records,
    "val": records.read_val_records,
    "test_texts": records.read_test_texts,
    "test_images": records.read_test_images,
    "text_segs": records.read_text_segs,
    "image_objects": records.read_image_objects,
    "vg_vocab": records.read_vg_vocab,
    "image_features": lambda p: feature_files.read_feature_jsonl(p, "image_id"),
    "text_features": lambda p: feature_files.read_feature_jsonl(p, "query_id"),
    "entity_features": lambda p: feature_files.read_entity_feature_jsonl(p, MAX_ENTITIES),
    "predictions": evaluation_files.read_predictions,
    "npz": read_npz,
}


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def write(folder: Path, content: bytes) -> Path:
    path = folder / "input.data"
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------
# random inputs

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.mark.parametrize("name", READERS)
@fuzz("bytes")
@given(content=st.binary(max_size=2000))
def test_random_bytes(folder, name, content):
    read(READERS[name], write(folder, content))


@pytest.mark.parametrize("name", READERS)
@fuzz("json")
@given(values=st.lists(json_values, max_size=4))
def test_random_json_lines(folder, name, values):
    read(READERS[name], write(folder, "\n".join(map(json.dumps, values)).encode()))


# ---------------------------------------------------------------------------------------------
# valid files, with what each reader must return

ids = st.integers(min_value=0, max_value=10**12) | st.text(max_size=8)
texts = st.text(max_size=30)
scores = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-1000, 1000)
float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)


@dataclass
class Valid:
    """JSON lines (or one JSON document as a single line) and the reader's expected result."""

    rows: list
    expected: object
    key: str | None = None  # the field whose duplication must fail


def unique_ids(min_size: int = 1, max_size: int = 5) -> st.SearchStrategy[list]:
    return st.lists(ids, min_size=min_size, max_size=max_size, unique_by=canonical_id)


@st.composite
def valid_train(draw) -> Valid:
    rows, expected = [], []
    for _ in range(draw(st.integers(1, 4))):
        flickr = draw(st.text(string.ascii_letters + string.digits, min_size=1, max_size=10))
        image_id, caption = draw(ids), draw(texts)
        segs = draw(st.lists(texts, max_size=3))
        preds = draw(st.lists(st.tuples(texts, scores), max_size=3))
        rows.append(
            {
                "image": f"flickr30k-images/{flickr}.jpg",
                "caption": caption,
                "image_id": image_id,
                "segs": segs,
                "preds": [{label: score} for label, score in preds],
            }
        )
        expected.append(
            records.TrainRecord(
                canonical_id(image_id),
                canonical_id(flickr),
                caption,
                tuple(segs),
                tuple((label, float(score)) for label, score in preds),
            )
        )
    return Valid(rows, expected)


@st.composite
def valid_val(draw) -> Valid:
    items = draw(st.lists(st.tuples(texts, texts | st.lists(texts, max_size=5)), min_size=1, max_size=4))
    rows = [[{"image": image, "caption": caption} for image, caption in items]]
    expected = [
        records.ValRecord(str(i), (caption,) if isinstance(caption, str) else tuple(caption))
        for i, (_, caption) in enumerate(items)
    ]
    return Valid(rows, expected)


@st.composite
def valid_test_texts(draw) -> Valid:
    keys = draw(unique_ids())
    rows = [
        {"query_id": k, "query_text": draw(texts), "item_ids": draw(st.lists(ids, max_size=5))} for k in keys
    ]
    expected = [
        records.TestText(
            canonical_id(r["query_id"]), r["query_text"], tuple(map(canonical_id, r["item_ids"]))
        )
        for r in rows
    ]
    return Valid(rows, expected, "query_id")


@st.composite
def valid_test_images(draw) -> Valid:
    rows = [{"image_id": k, "item_ids": draw(st.lists(ids, max_size=5))} for k in draw(unique_ids())]
    expected = [
        records.TestImage(canonical_id(r["image_id"]), tuple(map(canonical_id, r["item_ids"]))) for r in rows
    ]
    return Valid(rows, expected, "image_id")


def valid_keyed_lists(id_key: str, list_key: str):
    @st.composite
    def build(draw) -> Valid:
        rows = [{id_key: k, list_key: draw(st.lists(texts, max_size=4))} for k in draw(unique_ids())]
        return Valid(rows, {canonical_id(r[id_key]): r[list_key] for r in rows}, id_key)

    return build()


@st.composite
def valid_vg_vocab(draw) -> Valid:
    words = draw(st.lists(texts, min_size=1, max_size=4, unique=True))
    objects = st.fixed_dictionaries({"image_id": ids, "object": st.none() | st.text(max_size=4)})
    rows = [{"vocab": word, "objects": draw(st.lists(objects, max_size=4))} for word in words]
    expected = {r["vocab"]: [canonical_id(o["image_id"]) for o in r["objects"] if o["object"]] for r in rows}
    return Valid(rows, expected, "vocab")


def valid_features(id_key: str):
    @st.composite
    def build(draw) -> Valid:
        keys, dim = draw(unique_ids()), draw(st.integers(1, 4))
        vectors = [draw(st.lists(float32s, min_size=dim, max_size=dim)) for _ in keys]
        rows = [{id_key: k, "feature": v} for k, v in zip(keys, vectors, strict=True)]
        return Valid(rows, ([canonical_id(k) for k in keys], np.array(vectors, dtype=np.float32)), id_key)

    return build()


@st.composite
def valid_entity_features(draw) -> Valid:
    keys, dim = draw(unique_ids()), draw(st.integers(1, 4))
    slots = [draw(st.lists(st.lists(float32s, min_size=dim, max_size=dim), max_size=5)) for _ in keys]
    rows = [{"query_id": k, "feature": s} for k, s in zip(keys, slots, strict=True)]
    width = dim if any(slots) else 0
    features = np.zeros((len(keys), MAX_ENTITIES, width), np.float32)
    valid = np.zeros((len(keys), MAX_ENTITIES), bool)
    for i, vectors in enumerate(slots):
        kept = vectors[:MAX_ENTITIES]
        if kept:
            features[i, : len(kept)] = kept
            valid[i, : len(kept)] = True
    return Valid(rows, ([canonical_id(k) for k in keys], features, valid), "query_id")


@st.composite
def valid_predictions(draw) -> Valid:
    """Lines as ``prediction_rows`` writes them, or with ``[id, score]`` items (the reference's)."""
    id_key = draw(st.sampled_from(["query_id", "image_id"]))
    queries = [canonical_id(k) for k in draw(unique_ids())]
    gallery = [canonical_id(i) for i in draw(unique_ids(0, 6))]
    positions = st.lists(st.integers(0, len(gallery) - 1), unique=True) if gallery else st.just([])
    ranked = [draw(positions) + [-1] * draw(st.integers(0, 2)) for _ in queries]  # -1: none, left out
    rows = evaluation_files.prediction_rows(id_key, queries, gallery, ranked)
    if draw(st.booleans()):
        for row in rows:
            row["item_ids"] = [[item, draw(scores)] for item in row["item_ids"]]
    expected = (
        id_key,
        [
            evaluation_files.Prediction(q, tuple(gallery[i] for i in r if i >= 0))
            for q, r in zip(queries, ranked, strict=True)
        ],
    )
    return Valid(rows, expected, id_key)


VALID = {
    "train": valid_train(),
    "val": valid_val(),
    "test_texts": valid_test_texts(),
    "test_images": valid_test_images(),
    "text_segs": valid_keyed_lists("query_id", "items"),
    "image_objects": valid_keyed_lists("image_id", "image_objects"),
    "vg_vocab": valid_vg_vocab(),
    "image_features": valid_features("image_id"),
    "text_features": valid_features("query_id"),
    "entity_features": valid_entity_features(),
    "predictions": valid_predictions(),
}


def lines(valid: Valid) -> list[bytes]:
    return [json.dumps(row, ensure_ascii=False).encode() for row in valid.rows]


def same(result, expected) -> bool:
    if isinstance(expected, tuple) and any(isinstance(e, np.ndarray) for e in expected):
        return all(
            np.array_equal(r, e) if isinstance(e, np.ndarray) else r == e
            for r, e in zip(result, expected, strict=True)
        )
    return result == expected


@pytest.mark.parametrize("name", VALID)
@fuzz("valid")
@given(data=st.data())
def test_valid_files_round_trip(folder, name, data):
    valid = data.draw(VALID[name])
    path = folder / "input.data"
    write_jsonl(path, valid.rows)  # the project's own writer
    result = read(READERS[name], path)
    assert result is not None, "a valid file was rejected"
    assert same(result, valid.expected)


# ---------------------------------------------------------------------------------------------
# damaged valid files

JUNK_LINES = [
    b"",
    b"1" * 5000,  # an integer beyond Python's digit limit
    b"1e400",
    b"NaN",
    b'{"feature": [Infinity]}',
    b"[" * 100_000,  # deep nesting
    b'{"a": "\xff\xfe"}',  # invalid UTF-8
    b"\xef\xbb\xbf{}",  # a byte-order mark
    b'"\\ud800"',  # a lone surrogate
    b"{}",
    b"null",
]


@st.composite
def damage(draw, valid: Valid) -> tuple[list[bytes], bool]:
    """(damaged lines, whether the reader must reject them)."""
    rows = lines(valid)
    index = draw(st.integers(0, len(rows) - 1))
    kind = draw(st.sampled_from(["truncate", "retype", "drop", "duplicate", "junk", "empty", "flip"]))
    if kind == "truncate":
        cut = rows[index][: draw(st.integers(0, len(rows[index]) - 1))]
        return rows[:index] + [cut] + rows[index + 1 :], bool(cut.strip()) or len(rows) == 1
    if kind == "empty":
        return [], True
    if kind == "junk":
        return rows[:index] + [draw(st.sampled_from(JUNK_LINES))] + rows[index:], False
    if kind == "flip":
        line = bytearray(rows[index])
        line[draw(st.integers(0, len(line) - 1))] = draw(st.integers(0, 255))
        return rows[:index] + [bytes(line)] + rows[index + 1 :], False
    row = valid.rows[index]
    if kind == "duplicate" and valid.key is not None:
        return rows + [rows[index]], True
    if not isinstance(row, dict) or not row:
        return rows, False
    field = draw(st.sampled_from(sorted(row)))
    changed = dict(row)
    if kind == "drop":
        del changed[field]
    else:
        changed[field] = draw(json_values)
    return rows[:index] + [json.dumps(changed).encode()] + rows[index + 1 :], False


@pytest.mark.parametrize("name", VALID)
@fuzz("damaged")
@given(data=st.data())
def test_damaged_files_fail_cleanly(folder, name, data):
    damaged, must_fail = data.draw(damage(data.draw(VALID[name])))
    result = read(READERS[name], write(folder, b"\n".join(damaged)))
    if must_fail:
        assert result is None, "a damaged file was accepted"


# ---------------------------------------------------------------------------------------------
# npz archives

images = st.lists(float32s, min_size=3 * IMAGE_SIZE**2, max_size=3 * IMAGE_SIZE**2).map(
    lambda v: np.array(v, np.float32).reshape(3, IMAGE_SIZE, IMAGE_SIZE)
)


@st.composite
def npz_arrays(draw) -> dict[str, np.ndarray]:
    keys = draw(
        st.lists(
            st.text(string.ascii_letters + string.digits, min_size=1, max_size=6),
            min_size=1,
            max_size=3,
            unique_by=canonical_id,
        )
    )
    return {key: draw(images) for key in keys}


@fuzz("valid")
@given(arrays=npz_arrays())
def test_npz_round_trip(folder, arrays):
    path = folder / "images.npz"
    write_npz(path, arrays)
    result = read(read_npz, path)
    assert result is not None and result.keys() == {canonical_id(k) for k in arrays}
    assert all(np.array_equal(result[canonical_id(k)], a) for k, a in arrays.items())


BAD_ARRAYS = [
    np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.int64),
    np.zeros((3, IMAGE_SIZE + 1, IMAGE_SIZE), np.float32),
    np.full((3, IMAGE_SIZE, IMAGE_SIZE), np.nan, np.float32),
    np.array([{"pickled": 1}], dtype=object),
]


@fuzz("damaged")
@given(arrays=npz_arrays(), data=st.data())
def test_damaged_npz_fails_cleanly(folder, arrays, data):
    path, first = folder / "images.npz", next(iter(arrays))
    kind = data.draw(st.sampled_from(["truncate", "flip", "bad array", "same id"]))
    if kind == "bad array":
        arrays["bad"] = data.draw(st.sampled_from(BAD_ARRAYS))
    if kind == "same id":
        arrays["0" + first] = arrays[first]  # "012" and "12" name the same id
    write_npz(path, arrays)
    content = bytearray(path.read_bytes())
    if kind == "truncate":
        content = content[: data.draw(st.integers(0, len(content) - 1))]
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(content))
    result = read(read_npz, path)
    if kind in ("truncate", "bad array") or (kind == "same id" and first.isdigit()):
        assert result is None, f"a damaged npz ({kind}) was accepted"
