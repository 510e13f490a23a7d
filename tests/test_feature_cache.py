"""The cache of parsed feature files: keyed by content, verified on load, atomic, bounded; a sweep
parses once; a killed evaluation leaves nothing running and nothing locked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agree.atomic import write_jsonl
from agree.data import feature_cache
from agree.data.feature_cache import FeatureCache
from agree.data.feature_files import (
    parse_entity_feature_jsonl,
    read_feature_jsonl,
    write_feature_jsonl,
)

from .test_feature_files import UNSHARE, read_only_mounts

REPO = Path(__file__).resolve().parents[1]


def release_files(folder: Path, n_images: int = 8, dim: int = 6, slots: int = 3) -> dict[str, Path]:
    """Release-format test annotations (two captions per image) and the four feature files."""
    rng = np.random.default_rng(0)
    n_texts = 2 * n_images
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    texts = np.repeat(images, 2, axis=0) + rng.standard_normal((n_texts, dim)).astype(np.float32)
    image_ids, query_ids = [str(100 + i) for i in range(n_images)], [str(i) for i in range(n_texts)]
    paths = {name: folder / f"{name}.jsonl" for name in ("images", "texts", "segs", *FEATURES)}
    write_jsonl(
        paths["images"], [{"image_id": 100 + i, "item_ids": [2 * i, 2 * i + 1]} for i in range(n_images)]
    )
    write_jsonl(
        paths["texts"],
        [{"query_id": q, "query_text": f"caption {q}", "item_ids": [100 + q // 2]} for q in range(n_texts)],
    )
    counts = rng.integers(0, slots + 1, n_texts)
    write_jsonl(
        paths["segs"],
        [
            {"query_id": q, "query_text": f"caption {q}", "items": ["e"] * int(counts[q])}
            for q in range(n_texts)
        ],
    )
    write_feature_jsonl(paths["f_images"], "image_id", image_ids, images)
    write_feature_jsonl(paths["f_texts"], "query_id", query_ids, texts)
    valid = np.arange(slots)[None, :] < counts[:, None]
    for name in ("f_prompts", "f_masks"):
        entities = rng.standard_normal((n_texts, slots, dim)).astype(np.float32)
        write_feature_jsonl(paths[name], "query_id", query_ids, entities, valid)
    return paths


FEATURES = ("f_images", "f_texts", "f_prompts", "f_masks")


def evaluate_args(paths: dict[str, Path], *more: str) -> list[str]:
    return [
        f"annotations.images={paths['images']}",
        f"annotations.texts={paths['texts']}",
        f"annotations.text_segs={paths['segs']}",
        f"features.image_jsonl={paths['f_images']}",
        f"features.text_jsonl={paths['f_texts']}",
        f"features.prompt_jsonl={paths['f_prompts']}",
        f"features.mask_jsonl={paths['f_masks']}",
        *more,
    ]


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The files the cache parses (its readers, counted)."""
    parsed: list[str] = []

    def counted(reader):
        def parse(path, *args):
            parsed.append(Path(path).name)
            return reader(path, *args)

        return parse

    monkeypatch.setattr(feature_cache, "read_feature_jsonl", counted(read_feature_jsonl))
    monkeypatch.setattr(feature_cache, "parse_entity_feature_jsonl", counted(parse_entity_feature_jsonl))
    return parsed


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def read_all(cache: FeatureCache, paths: dict[str, Path]):
    return (
        cache.vectors(paths["f_images"], "image_id"),
        cache.vectors(paths["f_texts"], "query_id"),
        cache.entities(paths["f_prompts"]),
    )


def test_a_hit_memory_maps_arrays_equal_bit_for_bit_to_a_fresh_parse(tmp_path, parses) -> None:
    paths = release_files(tmp_path)
    fresh = read_all(FeatureCache(None), paths)
    cache = FeatureCache.open(tmp_path / "cache", 10**9)
    first = read_all(cache, paths)
    assert parses == ["f_images.jsonl", "f_texts.jsonl", "f_prompts.jsonl"] * 2  # no cache, then misses
    hit = read_all(FeatureCache.open(tmp_path / "cache", 10**9), paths)
    assert len(parses) == 6  # nothing parsed again
    for (ids, a), (ids2, b), (ids3, c) in zip(fresh[:2], first[:2], hit[:2], strict=True):
        assert ids == ids2 == ids3 and same_bits(a, b) and same_bits(a, c)
        assert isinstance(c, np.memmap) and c.flags.writeable  # copy on write: the entry never changes
    for name in ("vectors", "counts"):
        assert same_bits(getattr(fresh[2], name), getattr(hit[2], name))
    assert fresh[2].ids == hit[2].ids
    assert len(cache.entries()) == 3


def test_the_key_is_the_content_not_the_name_size_or_mtime(tmp_path, parses) -> None:
    paths = release_files(tmp_path)
    cache = FeatureCache.open(tmp_path / "cache", 10**9)
    ids, before = cache.vectors(paths["f_images"], "image_id")
    stat = paths["f_images"].stat()
    text = paths["f_images"].read_text()
    at = text.index('"feature":[') + len('"feature":[')
    at += text[at] == "-"
    changed = text[:at] + ("2" if text[at] == "1" else "1") + text[at + 1 :]  # one digit rewritten
    assert len(changed) == len(text) and changed != text
    paths["f_images"].write_text(changed)
    os.utime(paths["f_images"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert paths["f_images"].stat().st_mtime_ns == stat.st_mtime_ns
    _, after = cache.vectors(paths["f_images"], "image_id")
    assert parses == ["f_images.jsonl"] * 2  # a miss
    assert not np.array_equal(after[0], before[0]) and np.array_equal(after[1:], before[1:])
    copy = tmp_path / "elsewhere.jsonl"  # the same bytes under another name: a hit
    copy.write_text(changed)
    assert same_bits(cache.vectors(copy, "image_id")[1], after) and len(parses) == 2


def _entry_file(cache: FeatureCache, name: str) -> Path:
    (entry,) = cache.entries()
    return entry / name


@pytest.mark.parametrize(
    "damage, name",
    [("truncate", "features.npy"), ("flip", "features.npy"), ("flip", "ids.json"), ("empty", "entry.json")],
)
def test_a_damaged_entry_is_parsed_again_with_one_warning_and_replaced(
    tmp_path, parses, capsys, damage, name
) -> None:
    paths = release_files(tmp_path)
    cache = FeatureCache.open(tmp_path / "cache", 10**9)
    ids, fresh = cache.vectors(paths["f_texts"], "query_id")
    target = _entry_file(cache, name)
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip":
        data[-3] ^= 0x01
    else:
        data = bytearray()
    target.write_bytes(bytes(data))
    capsys.readouterr()
    again_ids, again = FeatureCache.open(tmp_path / "cache", 10**9).vectors(paths["f_texts"], "query_id")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "damaged feature-cache entry" in err[0]
    assert f"parsing {paths['f_texts']} again" in err[0]
    assert parses == ["f_texts.jsonl"] * 2
    assert again_ids == ids and same_bits(again, fresh)
    _, third = FeatureCache.open(tmp_path / "cache", 10**9).vectors(paths["f_texts"], "query_id")
    assert capsys.readouterr().err == "" and len(parses) == 2 and same_bits(third, fresh)  # replaced


FILL = """
import sys, time
from agree.data.feature_cache import FeatureCache
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
ids, features = FeatureCache.open(sys.argv[1], 10**9).vectors(sys.argv[2], "query_id")
print(len(ids), float(features.sum()))
"""


def test_two_processes_filling_one_entry_leave_one_valid_entry(tmp_path, capsys) -> None:
    paths = release_files(tmp_path, n_images=400, dim=256)  # a few MB: both parse at once
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.time() + 3  # both past their imports
    command = [sys.executable, "-c", FILL, str(tmp_path / "cache"), str(paths["f_texts"]), str(start)]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] and not any(err for _, err in outputs)
    cache = FeatureCache.open(tmp_path / "cache", 10**9)
    assert len(cache.entries()) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.entries()[0].name]  # no staging left
    ids, features = cache.vectors(paths["f_texts"], "query_id")
    assert capsys.readouterr().err == "" and isinstance(features, np.memmap)  # loaded, verified


def test_a_store_that_loses_the_race_keeps_the_winners_entry(tmp_path, capsys) -> None:
    """The rename of the second of two stores of one entry fails: its copy is dropped, silently."""
    paths = release_files(tmp_path)
    cache = FeatureCache.open(tmp_path / "cache", 10**9)
    ids, features = cache.vectors(paths["f_images"], "image_id")
    (entry,) = cache.entries()
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    cache._store(entry, (ids, {"features": features}), paths["f_images"])
    assert capsys.readouterr().err == ""
    assert cache.entries() == [entry] and {p.name: p.read_bytes() for p in entry.iterdir()} == before
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]


def test_an_unwritable_cache_dir_means_no_cache_in_one_line(tmp_path, capsys, parses) -> None:
    paths = release_files(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = FeatureCache.open(blocker / "cache", 10**9)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: cache_dir={blocker / 'cache'} cannot be written (")
    assert err[0].endswith("reading feature files without a cache")
    for _ in range(2):
        ids, _ = cache.vectors(paths["f_images"], "image_id")
    assert len(ids) == 8 and parses == ["f_images.jsonl"] * 2 and blocker.read_text() == "not a folder"


def test_entries_a_process_uses_are_not_evicted_by_it(tmp_path) -> None:
    """A sweep whose files exceed the bound keeps them while it runs (else each job would parse all)."""
    paths = release_files(tmp_path)
    folder = tmp_path / "cache"
    FeatureCache.open(folder, 10**9).vectors(paths["f_images"], "image_id")
    (entry,) = FeatureCache.open(folder, 10**9).entries()
    size = sum(p.stat().st_size for p in entry.iterdir())
    FeatureCache.open(folder, 10**9).clear()
    cache = FeatureCache.open(folder, size + size // 2)
    cache.vectors(paths["f_images"], "image_id")
    cache.vectors(paths["f_texts"], "query_id")
    assert len(cache.entries()) == 2  # over the bound: both in use
    other = tmp_path / "other.jsonl"
    other.write_text(paths["f_images"].read_text().replace('"image_id":"1', '"image_id":"9'))
    later = FeatureCache.open(folder, size + size // 2)  # the next command
    later.vectors(other, "image_id")
    assert [json.loads((e / "entry.json").read_text())["source"] for e in later.entries()] == [str(other)]


OPEN_AND_READ = """
import sys
from agree.data.feature_cache import FeatureCache
ids, _ = FeatureCache.open(sys.argv[1], 10**9).vectors(sys.argv[2], "image_id")
print(len(ids))
"""


@pytest.mark.skipif(not read_only_mounts(), reason="needs unshare -m and mount (root in a namespace)")
def test_a_read_only_cache_dir_means_no_cache_in_one_line(tmp_path) -> None:
    paths = release_files(tmp_path)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mount = f'mount -t tmpfs -o ro,size=1m none {read_only} && exec "$@"'
    python = [sys.executable, "-c", OPEN_AND_READ, str(read_only), str(paths["f_images"])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [UNSHARE, "-m", "sh", "-c", mount, "sh", *python], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout == "8\n", done.stderr
    (line,) = done.stderr.splitlines()
    assert (
        line.startswith(f"warning: cache_dir={read_only} cannot be written (")
        and "Read-only file system" in line
    )


def test_least_recently_used_entries_go_beyond_the_bound(tmp_path, parses) -> None:
    paths = release_files(tmp_path)
    folder = tmp_path / "cache"
    FeatureCache.open(folder, 10**9).vectors(paths["f_images"], "image_id")
    (entry,) = FeatureCache.open(folder, 10**9).entries()
    size = sum(p.stat().st_size for p in entry.iterdir())
    copies = []
    for i in range(3):  # three files of the same size, other contents
        copies.append(tmp_path / f"copy{i}.jsonl")
        copies[-1].write_text(paths["f_images"].read_text().replace('"image_id":"1', f'"image_id":"{i + 2}'))
    for copy in copies:
        FeatureCache.open(folder, 10**9).vectors(copy, "image_id")
    time.sleep(0.01)
    FeatureCache.open(folder, 10**9).vectors(paths["f_images"], "image_id")  # used again: the newest
    bound = FeatureCache.open(folder, 3 * size + size // 2)
    bound.vectors(copies[2], "image_id")  # a hit: nothing stored, nothing evicted
    assert len(bound.entries()) == 4
    extra = tmp_path / "extra.jsonl"
    extra.write_text(paths["f_images"].read_text().replace('"image_id":"1', '"image_id":"9'))
    bound.vectors(extra, "image_id")  # stored: the two least recently used go
    kept = {json.loads((e / "entry.json").read_text())["source"] for e in bound.entries()}
    assert kept == {str(paths["f_images"]), str(copies[2]), str(extra)}


def test_cache_clear_removes_entries_only(tmp_path) -> None:
    paths = release_files(tmp_path)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "0123").mkdir()
    cache = FeatureCache.open(folder, 10**9)
    cache.vectors(paths["f_images"], "image_id")
    cache.entities(paths["f_masks"])
    assert cache.clear() == 2 and cache.entries() == []
    assert sorted(p.name for p in folder.iterdir()) == ["0123", "notes.txt"]


def test_evaluate_reads_the_cache_under_xdg_cache_home_unless_cache_dir_is_null(
    tmp_path, feature_cache_dir, parses, capsys
) -> None:
    from hydra import compose, initialize_config_module

    from agree.evaluate import evaluate

    paths = release_files(tmp_path)

    def run(*more: str) -> dict:
        with initialize_config_module("agree.conf", version_base="1.3"):
            cfg = compose(
                "evaluate", evaluate_args(paths, f"output_dir={tmp_path / 'out'}", "rerank=egr_tbr", *more)
            )
        return evaluate(cfg)

    results = run("cache_dir=null")
    assert len(parses) == 4 and not feature_cache_dir.exists()
    assert run() == results and len(parses) == 8  # into $XDG_CACHE_HOME/agree
    assert len(FeatureCache.open(feature_cache_dir, 10**9).entries()) == 4
    assert run() == results and len(parses) == 8  # read from it
    capsys.readouterr()
    assert run("cache_clear=true") == results and len(parses) == 12  # emptied, then filled again
    assert capsys.readouterr().err.startswith(f"cache_clear: removed 4 entries of {feature_cache_dir}")


def test_a_sweep_parses_each_file_once(tmp_path, monkeypatch, parses) -> None:
    """``agree.evaluate -m rerank.text_to_image.raw_weight=0.5,1,2`` (Hydra's basic launcher, one
    process): the first job parses the four files, the others read them from the cache."""
    import agree.evaluate

    paths = release_files(tmp_path)
    sweep = tmp_path / "sweep"
    argv = ["agree.evaluate", "-m", "rerank=egr_tbr", "rerank.text_to_image.raw_weight=0.5,1,2"]
    argv += [f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}", *evaluate_args(paths)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    agree.evaluate.main()
    assert sorted(parses) == sorted(p.name for key, p in paths.items() if key in FEATURES)
    results = [json.loads((sweep / job / "results.json").read_text()) for job in "012"]
    assert all(r["egr"]["rsum"] > 0 for r in results)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _processes() -> dict[int, list[str]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = fields
    return found


def _descendants(pid: int) -> set[int]:
    processes, found, todo = _processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, fields in processes.items() if int(fields[1]) == parent}
        found |= children
        todo += children
    return found


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _reading_position(pid: int, path: Path) -> int | None:
    """The offset at which process ``pid`` reads ``path`` (None while it has it not open)."""
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            if os.readlink(fd) == str(path):
                return int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return None


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs Linux's /proc")
def test_kill_9_mid_parse_leaves_no_process_and_no_stale_lock(tmp_path) -> None:
    """Issue 20 rows 5 and 6: ``kill -9`` of ``agree.evaluate`` while it parses a feature file over
    16 MB left parser workers holding the run lock; now the file is parsed in the process itself."""
    paths = release_files(tmp_path, n_images=1200, dim=768, slots=0)
    size = paths["f_texts"].stat().st_size
    assert size > 16 << 20
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "agree.evaluate",
        f"hydra.run.dir={run_dir}",
        f"output_dir={tmp_path / 'out'}",
    ]
    command += evaluate_args(paths, "rerank=tbr", f"cache_dir={tmp_path / 'cache'}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline, position, children = time.monotonic() + 120, None, set()
    while time.monotonic() < deadline and process.poll() is None:
        position = _reading_position(process.pid, paths["f_texts"])
        if position is not None and 0 < position < size:
            children = _descendants(process.pid)
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    process.communicate(timeout=60)  # a process left holding its pipes would block here
    assert position is not None and 0 < position < size, "the command was not seen reading the file"
    assert process.returncode == -signal.SIGKILL
    assert children == set()  # nothing was started to parse the file
    time.sleep(3)
    alive = [p for p, fields in _processes().items() if int(fields[2]) == process.pid and _alive(p)]
    assert alive == [] and not any(_alive(p) for p in children)
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # the lock went with the process
    assert "warning" not in again.stderr and (tmp_path / "out" / "results.json").is_file()
