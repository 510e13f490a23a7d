"""Feature JSONL files parsed by several processes read exactly as in one, errors naming the line."""

import os
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import numpy as np
import pytest

from agree.data import feature_files, lines
from agree.data.feature_files import (
    _feature_row,
    read_entity_feature_jsonl,
    read_feature_jsonl,
    write_feature_jsonl,
)
from agree.errors import DataFormatError


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranges of a few lines each, parsed by two worker processes."""
    monkeypatch.setattr(lines, "RANGE_BYTES", 300)
    monkeypatch.setattr(lines, "_default_workers", lambda: 2)


def features(tmp_path, n=40, dim=6):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    path = tmp_path / "f.jsonl"
    write_feature_jsonl(path, "image_id", [str(1000 + i) for i in range(n)], rows)
    return path, rows


def test_parallel_read_equals_one_process(tmp_path, small_ranges) -> None:
    path, rows = features(tmp_path)
    ranges = lines._byte_ranges(path, path.stat().st_size, lines.RANGE_BYTES)
    assert len(ranges) > 4 and ranges[-1][1] == path.stat().st_size
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


def test_parallel_read_names_the_bad_line(tmp_path, small_ranges) -> None:
    path, _ = features(tmp_path)
    text = path.read_bytes().split(b"\n")
    text.insert(3, b"")  # a blank line still counts
    text[31] = text[31].replace(b"[", b"[NaN,", 1)
    path.write_bytes(b"\n".join(text))
    with pytest.raises(DataFormatError, match=rf"^{path}:32: image_id 1030: feature contains NaN"):
        read_feature_jsonl(path, "image_id")
    text[31] = text[1]  # a duplicate id, found across ranges
    path.write_bytes(b"\n".join(text))
    with pytest.raises(DataFormatError, match=rf"^{path}:32: duplicate image_id '?1001"):
        read_feature_jsonl(path, "image_id")


def test_blank_lines_crlf_and_a_last_line_without_newline(tmp_path) -> None:
    """Lines are cut from the range's bytes without copies: numbering and blank lines as before."""
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


def test_workers_leave_no_files_even_when_the_reader_stops_early(tmp_path, small_ranges, monkeypatch) -> None:
    """The parsed arrays come back through files in a scratch folder, removed with every file."""
    path, rows = features(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(lines, "_scratch_root", lambda: str(scratch))
    got = [value for _, value in lines.parsed_lines(path, partial(_feature_row, id_key="image_id"))]
    np.testing.assert_array_equal(np.stack([array for _, array in got]), rows)
    assert all(array.flags.writeable for _, array in got)
    assert list(scratch.iterdir()) == []
    reader = lines.parsed_lines(path, partial(_feature_row, id_key="image_id"))
    next(reader)
    assert len(list(scratch.iterdir())) == 1  # the call's folder, while it reads
    reader.close()
    assert list(scratch.iterdir()) == []
    reader = lines.parsed_lines(path, partial(_feature_row, id_key="image_id"))
    del reader  # dropped unread: its folder goes too
    assert list(scratch.iterdir()) == []


@pytest.fixture
def fresh_pool(monkeypatch: pytest.MonkeyPatch):
    """Workers forked from this test's state (a patch made before the first read reaches them)."""

    def shut_down():
        if lines._workers is not None:
            lines._workers[1].shutdown()
        monkeypatch.setattr(lines, "_workers", None)

    shut_down()
    yield
    shut_down()


def test_a_full_scratch_folder_sends_the_arrays_through_the_pipe(
    tmp_path, small_ranges, fresh_pool, monkeypatch
) -> None:
    def full(file, buffers):
        file.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lines, "_write_buffers", full)
    sizes = []
    received = lines._received

    def noted(folder, byte_range, result):
        sizes.append(result[2])
        return received(folder, byte_range, result)

    monkeypatch.setattr(lines, "_received", noted)
    path, rows = features(tmp_path)
    ids, got = read_feature_jsonl(path, "image_id")
    assert ids == [str(1000 + i) for i in range(40)]
    np.testing.assert_array_equal(got, rows)
    assert len(sizes) > 4 and set(sizes) == {None}  # every range came through the pipe


def test_a_pool_broken_by_a_dead_worker_is_replaced(tmp_path, small_ranges, fresh_pool) -> None:
    path, rows = features(tmp_path)
    read_feature_jsonl(path, "image_id")
    broken = lines._workers[1]
    with pytest.raises(BrokenProcessPool):
        broken.submit(os._exit, 1).result()  # a worker dies, as when the kernel kills it
    ids, got = read_feature_jsonl(path, "image_id")
    np.testing.assert_array_equal(got, rows)
    assert lines._workers[1] is not broken


def test_a_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch) -> None:
    """An OSError when the parsing starts, or while the rows are read, names the file."""
    path, _ = features(tmp_path)

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def fails_midway(*args, **kwargs):
        yield f"{path}:1", ("1000", np.zeros(6, np.float32))
        raise OSError(5, "Input/output error")

    for parsed, message in ((unreadable, "Permission denied"), (fails_midway, "Input/output error")):
        monkeypatch.setattr(feature_files, "parsed_lines", parsed)
        with pytest.raises(DataFormatError, match=rf"^{path}: cannot read \(.*{message}"):
            read_feature_jsonl(path, "image_id")
