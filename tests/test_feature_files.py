"""Feature JSONL files read in one process: line numbers, one-line errors, wrong values, long lines."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agree.data import fast_feature_rows
from agree.data.feature_files import (
    EntityRows,
    entity_slots,
    read_entity_feature_jsonl,
    read_feature_jsonl,
    write_feature_jsonl,
)
from agree.errors import DataFormatError

REPO = Path(__file__).resolve().parents[1]


def features(tmp_path, n=40, dim=6):
    rows = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    path = tmp_path / "f.jsonl"
    write_feature_jsonl(path, "image_id", [str(1000 + i) for i in range(n)], rows)
    return path, rows


def test_rows_and_entity_slots_read_as_written(tmp_path) -> None:
    path, rows = features(tmp_path)
    ids, got = read_feature_jsonl(path, "image_id")
    assert ids == [str(1000 + i) for i in range(40)]
    np.testing.assert_array_equal(got, rows)
    valid = np.arange(4)[None, :] < np.arange(40)[:, None] % 5
    entity_path = tmp_path / "e.jsonl"
    entities = np.repeat(rows[:, None], 4, 1)
    write_feature_jsonl(entity_path, "query_id", [str(i) for i in range(40)], entities, valid)
    _, entity_rows, entity_valid = read_entity_feature_jsonl(entity_path, 4)
    np.testing.assert_array_equal(entity_valid, valid)
    np.testing.assert_array_equal(entity_rows[valid], entities[valid])
    assert not entity_rows[~valid].any()
    _, first_two, first_valid = read_entity_feature_jsonl(entity_path, 2)  # the first vectors are kept
    np.testing.assert_array_equal(first_valid, valid[:, :2])
    np.testing.assert_array_equal(first_two[first_valid], entities[:, :2][valid[:, :2]])


def test_entity_slots_are_a_view_when_every_query_fills_them() -> None:
    vectors = np.arange(24, dtype=np.float32).reshape(6, 4)
    full = EntityRows(["1", "2", "3"], vectors, np.array([2, 2, 2]))
    slots, valid = entity_slots(full, 2)
    assert valid.all() and np.shares_memory(slots, vectors)
    np.testing.assert_array_equal(slots, vectors.reshape(3, 2, 4))
    ragged = EntityRows(["1", "2", "3"], vectors, np.array([3, 0, 3]))
    slots, valid = entity_slots(ragged, 2)
    np.testing.assert_array_equal(valid, [[True, True], [False, False], [True, True]])
    np.testing.assert_array_equal(slots[0], vectors[:2])
    np.testing.assert_array_equal(slots[2], vectors[3:5])
    assert not slots[1].any()


def test_a_bad_line_is_named_once(tmp_path) -> None:
    path, _ = features(tmp_path)
    text = path.read_bytes().split(b"\n")
    text.insert(3, b"")  # a blank line still counts
    text[31] = text[31].replace(b"[", b"[NaN,", 1)
    path.write_bytes(b"\n".join(text))
    with pytest.raises(DataFormatError, match=rf"^{path}:32: image_id 1030: feature contains NaN"):
        read_feature_jsonl(path, "image_id")
    text[31] = text[1]  # a duplicate id
    path.write_bytes(b"\n".join(text))
    with pytest.raises(DataFormatError, match=rf"^{path}:32: duplicate image_id '?1001"):
        read_feature_jsonl(path, "image_id")


def test_blank_lines_crlf_and_a_last_line_without_newline(tmp_path) -> None:
    path, rows = features(tmp_path, n=3)
    first, second, third = path.read_bytes().split(b"\n")[:3]
    body = first + b"\r\n \t\x0b\x0c\r\n\n" + second + b"\n" + third  # lines 1-5, no final newline
    path.write_bytes(body)
    ids, got = read_feature_jsonl(path, "image_id")
    assert ids == ["1000", "1001", "1002"]
    np.testing.assert_array_equal(got, rows)
    path.write_bytes(body + b"\n{")
    with pytest.raises(DataFormatError, match=rf"^{path}:6: malformed JSON"):
        read_feature_jsonl(path, "image_id")


class _FailingAfter(io.RawIOBase):
    """A file whose reads fail (EIO) after its first ``good`` bytes."""

    def __init__(self, data: bytes, good: int) -> None:
        self.data, self.good, self.at = data, good, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.at >= self.good:
            raise OSError(5, "Input/output error")
        chunk = self.data[self.at : self.good][: len(buffer)]
        buffer[: len(chunk)] = chunk
        self.at += len(chunk)
        return len(chunk)


def test_a_file_that_cannot_be_read_is_one_line(tmp_path) -> None:
    path, _ = features(tmp_path)
    first_line = len(path.read_bytes().split(b"\n")[0]) + 1
    failing = io.BufferedReader(_FailingAfter(path.read_bytes(), first_line), buffer_size=64)
    with pytest.raises(DataFormatError, match=rf"^{path}: cannot read \(.*Input/output error"):
        read_feature_jsonl(path, "image_id", failing)
    with pytest.raises(DataFormatError, match=rf"^{tmp_path}: file not found"):
        read_feature_jsonl(tmp_path, "image_id")


@pytest.fixture(params=["fast", "validated"])
def rows_path(request, monkeypatch) -> str:
    """Each test twice: with the fast path where it applies, and with every row validated."""
    if request.param == "validated":
        monkeypatch.setattr(fast_feature_rows, "simdjson", None)
    elif not fast_feature_rows.available():
        pytest.skip("pysimdjson is not installed")
    return request.param


@pytest.mark.parametrize(
    "feature", ["[true, -0.13, 0.5]", "[0.2, false]", "[[0.1, 0.2], [true, 0.3]]", "[[false]]"]
)
def test_booleans_in_a_feature_are_refused(tmp_path, rows_path, feature) -> None:
    """Issue 20 row 11: ``[true, -0.13, ...]`` was read as 1.0."""
    path = tmp_path / "bool.jsonl"
    entities = feature.startswith("[[")
    first = "[[0.5, 0.5]]" if entities else "[0.5, 0.5]"
    path.write_text(f'{{"query_id": 1, "feature": {first}}}\n{{"query_id": 2, "feature": {feature}}}\n')
    with pytest.raises(
        DataFormatError, match=rf"^{path}:2: 'feature' holds true/false; features are numbers$"
    ):
        if entities:
            read_entity_feature_jsonl(path, 2)
        else:
            read_feature_jsonl(path, "query_id")


def test_an_id_that_says_true_is_no_boolean(tmp_path, rows_path) -> None:
    path = tmp_path / "ids.jsonl"
    path.write_text('{"image_id": "true", "feature": [1, 0]}\n')
    assert read_feature_jsonl(path, "image_id")[0] == ["true"]


def test_a_bad_utf8_line_is_located_once(tmp_path, rows_path) -> None:
    """Issue 20 row 17: the location was printed twice (``FILE:2: FILE:2: not UTF-8 ...``)."""
    path = tmp_path / "utf8.jsonl"
    path.write_bytes(b'{"image_id": "1", "feature": [1]}\n{"image_id": "\xff", "feature": [1]}\n')
    with pytest.raises(DataFormatError) as error:
        read_feature_jsonl(path, "image_id")
    assert str(error.value) == f"{path}:2: not UTF-8 text (invalid byte at position 14)"


def test_a_huge_integer_id_is_an_integer(tmp_path, rows_path) -> None:
    """Issue 20 row 17: orjson reads an integer beyond 64 bits as a float ("got float"); such an id
    is an integer id like any other, and a real float id is still refused as one."""
    huge = 123456789012345678901234567890
    path = tmp_path / "huge.jsonl"
    path.write_text(f'{{"query_id": {huge}, "feature": [1, 2]}}\n{{"query_id": 7, "feature": [3, 4]}}\n')
    ids, _ = read_feature_jsonl(path, "query_id")
    assert ids == [str(huge), "7"]
    path.write_text('{"query_id": 7.0, "feature": [3, 4]}\n')
    with pytest.raises(DataFormatError, match=rf"^{path}:1: key 'query_id' should be int/str, got float$"):
        read_feature_jsonl(path, "query_id")


@pytest.mark.skipif(not fast_feature_rows.available(), reason="pysimdjson is not installed")
def test_a_row_longer_than_simdjsons_array_count_takes_the_fast_path() -> None:
    """simdjson counts at most 2**24 - 1 elements of an array: longer rows used to fall back to the
    validated path (the 200 MB row of issue 20 row 19: 19 s)."""
    n = 2**24 + 3
    line = b'{"image_id": "5", "feature": [' + b"0," * (n - 3) + b"1.5,-2,3]}\n"
    got = fast_feature_rows.fast_feature_row(line, "image_id", "f:1")
    assert got is not None
    key, array = got
    assert key == "5" and array.shape == (n,) and array.dtype == np.float32
    np.testing.assert_array_equal(array[-4:], [0, 1.5, -2, 3])
    assert not array[:-3].any()


MEMORY = """
import resource, sys
from agree.data import fast_feature_rows
from agree.data.feature_files import read_feature_jsonl
if sys.argv[2] == "validated":
    fast_feature_rows.simdjson = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids, features = read_feature_jsonl(sys.argv[1], "image_id")
assert features.shape == (1, int(sys.argv[3]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("path_taken, bound", [("fast", 6), ("validated", 9)])
def test_a_long_row_costs_a_small_multiple_of_its_size(tmp_path, path_taken, bound) -> None:
    """Issue 20 row 19: a 200 MB single-line row took 5.4 GB; now a 20 MB one takes at most
    ``bound`` times its size over the reader's own start (peak resident memory, a fresh process)."""
    if path_taken == "fast" and not fast_feature_rows.available():
        pytest.skip("pysimdjson is not installed")
    n = 1_800_000
    path = tmp_path / "long.jsonl"
    values = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    write_feature_jsonl(path, "image_id", ["1"], values)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", MEMORY, str(path), path_taken, str(n)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    grown = int(done.stdout.strip())
    assert grown < bound * path.stat().st_size, f"{grown / path.stat().st_size:.1f}x the row's size"


UNSHARE = shutil.which("unshare")


def read_only_mounts() -> bool:
    """Whether a test can mount a read-only tmpfs in a mount namespace of its own (root, unshare)."""
    if UNSHARE is None:
        return False
    probe = [UNSHARE, "-m", "sh", "-c", "mount -t tmpfs -o ro,size=1m none /dev/shm"]
    return subprocess.run(probe, capture_output=True).returncode == 0


READ_BIG = """
import sys
from agree.data.feature_files import read_feature_jsonl
ids, features = read_feature_jsonl(sys.argv[1], "image_id")
print(len(ids), features.shape[1], float(features.sum()))
"""


@pytest.mark.skipif(not read_only_mounts(), reason="needs unshare -m and mount (root in a namespace)")
def test_a_read_only_dev_shm_and_temporary_folder_change_nothing(tmp_path) -> None:
    """Issue 20 row 7: with ``/dev/shm`` read-only, a feature file over 16 MB failed ("Read-only file
    system", blamed on the file). The reader uses no scratch space: the same result either way."""
    n, dim = 4000, 512
    rows = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
    path = tmp_path / "big.jsonl"
    write_feature_jsonl(path, "image_id", [str(i) for i in range(n)], rows)
    assert path.stat().st_size > 16 << 20
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": "/dev/shm"}
    python = [sys.executable, "-c", READ_BIG, str(path)]
    plain = subprocess.run(python, capture_output=True, text=True, env=env, check=True).stdout
    script = 'mount -t tmpfs -o ro,size=1m none /dev/shm && exec "$@"'
    read_only = subprocess.run(
        [UNSHARE, "-m", "sh", "-c", script, "sh", *python], capture_output=True, text=True, env=env
    )
    assert read_only.returncode == 0, read_only.stderr
    assert read_only.stdout == plain and plain.split()[:2] == [str(n), str(dim)]
