"""The fast path of the feature readers gives exactly the validated path's rows, and declines the rest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agree.data import fast_feature_rows, feature_files
from agree.data.fast_feature_rows import fast_feature_row
from agree.errors import DataFormatError

pytestmark = pytest.mark.skipif(not fast_feature_rows.available(), reason="pysimdjson is not installed")

PLAIN = [
    b'{"image_id":"9","feature":[0.25,-1.5,3]}',
    b'{"image_id": "0042", "feature": [0.1, -0.2, 0.30000001]}',  # Python's json.dumps spacing
    b'{ "query_id" : 7 ,\t"feature" : [ 1e-5 , 2E+3,-4.5e-12 ] }\r',  # odd whitespace, exponents
    b'{"query_id":-3,"feature":[-0,-0.0,0,0.0,1,-2]}',  # integers, both zeros
    b'{"query_id":8,"feature":[16777217,9007199254740991,-123456789]}',  # integers rounded to float32
    b'{"query_id":8,"feature":[1e-45,1e-50,123456.789]}',  # float32 denormal, underflow
    b'{"query_id":8,"feature":[[0.5,1],[2,-0.0]]}',  # entity features: lists of vectors
    b'{"query_id":8,"feature":[ [ 1e2 ] ,[-3] , [0.125]]}',
    b'{"feature":[1,2],"query_id":8}',  # key order
]

DECLINED = [
    b'\xef\xbb\xbf{"query_id":8,"feature":[1]}',  # BOM: orjson refuses it
    b' {"query_id":8,"feature":[1]}',
    b'{"query_id":8,"query_id":9,"feature":[1]}',  # duplicate key
    b'{"query_id":8,"feature":[1],"other":2}',
    b'{"query_id":true,"feature":[1]}',
    b'{"query_id":8.0,"feature":[1]}',
    b'{"query_id":"\\ud800","feature":[1]}',  # lone surrogate
    b'{"query_id":123456789012345678901234567890,"feature":[1]}',
    b'{"query_id":8,"feature":[]}',
    b'{"query_id":8,"feature":[[]]}',
    b'{"query_id":8,"feature":[true,1]}',
    b'{"query_id":8,"feature":[null]}',
    b'{"query_id":8,"feature":["1"]}',
    b'{"query_id":8,"feature":[1,[2]]}',  # as_buffer would flatten these
    b'{"query_id":8,"feature":[[1,2],[3]]}',
    b'{"query_id":8,"feature":[[[1]],[[2]]]}',
    b'{"query_id":8,"feature":[[[],[1,2]],[[3],[4,5]]]}',
    b'{"query_id":"[","feature":[1]}',  # a bracket in the id: left to the validated path
    b'{"query_id":8,"feature":[9007199254740993]}',  # not exact as float64
    b'{"query_id":8,"feature":[3.4028234663852886e38]}',  # any value from 2**53 on
    b'{"query_id":8,"feature":[18446744073709551615]}',
    b'{"query_id":8,"feature":[1e39]}',  # beyond float32
    b'{"query_id":8,"feature":[1e400]}',
    b'{"query_id":8,"feature":[NaN]}',
    b'{"query_id":8,"feature":[1,]}',
    b'{"query_id":8,"feature":[1]} x',
    b'{"query_id":8,"feature":{"a":1}}',
    b"[1,2]",
]


def _same(fast: tuple[str, np.ndarray], line: bytes) -> None:
    key, array = feature_files._validated_row(line, "f:1", "query_id" if b"query_id" in line else "image_id")
    assert fast[0] == key
    assert fast[1].dtype == array.dtype == np.float32 and fast[1].shape == array.shape
    assert np.array_equal(fast[1].view(np.uint32), array.view(np.uint32))  # bit for bit: -0.0 too


@pytest.mark.parametrize("line", PLAIN)
def test_plain_rows_take_the_fast_path_and_equal_the_validated_path(line: bytes) -> None:
    id_key = "query_id" if b"query_id" in line else "image_id"
    fast = fast_feature_row(line, id_key, "f:1")
    assert fast is not None
    _same(fast, line)


@pytest.mark.parametrize("line", DECLINED)
def test_unusual_rows_are_left_to_the_validated_path(line: bytes) -> None:
    assert fast_feature_row(line, "query_id", "f:1") is None


@pytest.mark.parametrize("reader", ["vectors", "entities"])
def test_files_read_alike_with_and_without_the_fast_path(tmp_path, monkeypatch, reader: str) -> None:
    """Whole files, valid or not: the same arrays, or the same one-line error."""
    read = {
        "vectors": lambda p: feature_files.read_feature_jsonl(p, "query_id"),
        "entities": lambda p: feature_files.read_entity_feature_jsonl(p, 2),
    }[reader]
    good = (
        b'{"query_id":1,"feature":[[1,2]]}\n' if reader == "entities" else b'{"query_id":1,"feature":[1,2]}\n'
    )
    for n, bad in enumerate([*PLAIN, *DECLINED]):
        path = tmp_path / f"{reader}{n}.jsonl"
        path.write_bytes(good + b"\n" + bad + b"\n" + good.replace(b":1,", b":2,"))
        outcomes = []
        for fast in (True, False):
            if not fast:
                monkeypatch.setattr(fast_feature_rows, "simdjson", None)
            try:
                outcomes.append(("ok", read(path)))
            except DataFormatError as e:
                outcomes.append(("error", str(e)))
        (kind, first), (kind2, second) = outcomes
        assert kind == kind2, bad
        if kind == "error":
            assert first == second
        else:
            assert first[0] == second[0]
            for a, b in zip(first[1:], second[1:], strict=True):
                assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
        monkeypatch.undo()


# features are far below 2**53, from where the validated path reads the rows
floats = st.floats(-(2.0**50), 2.0**50, width=32) | st.integers(-(2**31), 2**31)


def _spell(value: float | int, style: int) -> str:
    if isinstance(value, int):
        return str(value)
    return [repr(value), f"{value:.9e}", f"{value:.17g}", f"{value:E}"][style]


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(floats, min_size=3, max_size=3), min_size=1, max_size=3),
    style=st.integers(0, 3),
    spacing=st.sampled_from([",", ", ", " ,\t", ",  "]),
    nested=st.booleans(),
)
def test_any_spelling_of_numbers_equals_the_validated_path(rows, style, spacing, nested) -> None:
    def vector(values: list) -> str:
        return "[" + spacing.join(_spell(v, style) for v in values) + "]"

    body = "[" + spacing.join(vector(r) for r in rows) + "]" if nested else vector(rows[0])
    line = f'{{"query_id": 5{spacing}"feature":{body}}}'.encode()
    json.loads(line)  # a valid line
    fast = fast_feature_row(line, "query_id", "f:1")
    assert fast is not None
    _same(fast, line)
