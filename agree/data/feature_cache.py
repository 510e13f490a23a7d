"""A content-addressed cache of parsed feature JSONL files: each file is parsed once.

The first read of a feature file (image, text, entity prompt or masked caption features) stores its
ids and arrays in the feature store's format (``NAME.npy`` + ``ids.json``) in an entry folder of the
cache, ``CACHE_DIR/<xxh3-128 of the file's bytes>.<reader>.v<FORMAT>``; a later read of a file with
the same bytes, wherever it lies and whatever its name or time stamps, memory-maps them instead. The
key is the whole content: a file rewritten with the same size and mtime is a miss. Hashing reads the
file at memory speed (``scripts/bench_release.py`` prints it beside the parse it saves).

An entry is written into a staging folder and renamed into place whole (of two processes filling
the same entry at once, the second rename fails and its copy is dropped). ``entry.json`` records
each file's shape, dtype and xxh3 checksum; a load checks them all, and an entry that fails is
reported in one warning line, removed, parsed again and replaced, never used. Entries beyond
``max_bytes`` are removed, least recently used first (a hit touches its ``entry.json``). Only folders
named as entries are ever removed: ``cache_dir`` may be a folder holding other things.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import xxhash

from agree.atomic import atomic_path, staging_dir, write_json, write_npy
from agree.data.feature_files import EntityRows, parse_entity_feature_jsonl, read_feature_jsonl
from agree.errors import DataFormatError, one_line

FORMAT = 1  # of the entries: a change gives new names, and the old entries age out
ENTRY = "entry.json"
IDS = "ids.json"
ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.[a-z_]+\.v[0-9]+")
CHUNK = 8 << 20  # bytes read at a time when hashing

# (ids, named arrays) as stored in an entry
Stored = tuple[list[str], dict[str, np.ndarray]]


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/agree``, or ``~/.cache/agree`` where it is unset or empty (the XDG rule)."""
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agree")


class _Hashing(io.RawIOBase):
    """A raw binary file that hashes every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = xxhash.xxh3_128()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer)
        self.hash.update(memoryview(buffer)[:count])
        return count


def _digest(data) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def file_digest(path: str | os.PathLike) -> str:
    """The xxh3-128 of a file's bytes (hex); an unreadable file is a one-line error."""
    buffer = bytearray(CHUNK)
    try:
        with open(path, "rb", buffering=0) as raw:
            hashing = _Hashing(raw)
            while hashing.readinto(buffer):
                pass
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({one_line(e)})") from None
    return hashing.hash.hexdigest()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class FeatureCache:
    """Parsed feature files by content, under ``folder`` (None: no cache, every read parses)."""

    def __init__(self, folder: Path | None, max_bytes: int = 0) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.used: set[str] = set()  # entries read or written by this process: never evicted by it

    @classmethod
    def open(cls, folder: str | os.PathLike | None, max_bytes: int) -> FeatureCache:
        """The cache in ``folder`` (made if missing); a folder that cannot be written is no cache,
        with one warning line."""
        if folder is None:
            return cls(None)
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            _warn(
                f"cache_dir={folder} cannot be written ({one_line(e)}); reading feature files without a cache"
            )
            return cls(None)
        return cls(folder, max_bytes)

    def entries(self) -> list[Path]:
        """The entry folders (and only those: anything else in the folder is not the cache's)."""
        if self.folder is None:
            return []
        return [p for p in self.folder.iterdir() if ENTRY_NAME.fullmatch(p.name) and p.is_dir()]

    def clear(self) -> int:
        """Remove every entry; return how many there were."""
        entries = self.entries()
        for entry in entries:
            shutil.rmtree(entry, ignore_errors=True)
        return len(entries)

    def vectors(self, path: str | os.PathLike, id_key: str) -> tuple[list[str], np.ndarray]:
        """:func:`~agree.data.feature_files.read_feature_jsonl` of ``path``, parsed once."""

        def parse(file: BinaryIO | None) -> Stored:
            ids, features = read_feature_jsonl(path, id_key, file)
            return ids, {"features": features}

        def consistent(ids: list[str], arrays: dict[str, np.ndarray]) -> bool:
            features = arrays["features"]
            return features.ndim == 2 and len(features) == len(ids) and features.shape[1] > 0

        ids, arrays = self._read(Path(path), id_key, parse, consistent)
        return ids, arrays["features"]

    def entities(self, path: str | os.PathLike) -> EntityRows:
        """:func:`~agree.data.feature_files.parse_entity_feature_jsonl` of ``path``, parsed once."""

        def parse(file: BinaryIO | None) -> Stored:
            rows = parse_entity_feature_jsonl(path, file)
            return rows.ids, {"features": rows.vectors, "counts": rows.counts}

        def consistent(ids: list[str], arrays: dict[str, np.ndarray]) -> bool:
            features, counts = arrays["features"], arrays["counts"]
            return (
                features.ndim == 2
                and counts.shape == (len(ids),)
                and bool((counts >= 0).all())
                and int(counts.sum()) == len(features)
            )

        ids, arrays = self._read(Path(path), "entities", parse, consistent)
        return EntityRows(ids, arrays["features"], arrays["counts"])

    def _read(
        self,
        path: Path,
        reader: str,
        parse: Callable[[BinaryIO | None], Stored],
        consistent: Callable[[list[str], dict[str, np.ndarray]], bool],
    ) -> Stored:
        """The stored parse of ``path``'s content, or ``parse`` of it, stored."""
        if self.folder is None:
            return parse(None)
        if not path.is_file():
            raise DataFormatError(f"{path}: file not found")
        entry = self.folder / f"{file_digest(path)}.{reader}.v{FORMAT}"
        stored = self._load(entry, path, consistent)
        if stored is not None:
            return stored
        try:
            with open(path, "rb", buffering=0) as raw:
                hashing = _Hashing(raw)
                file = io.BufferedReader(hashing, buffer_size=1 << 20)
                stored = parse(file)
                file.read()  # (nothing is left) every byte hashed
        except OSError as e:
            raise DataFormatError(f"{path}: cannot read ({one_line(e)})") from None
        # the content parsed, which is the content hashed above unless the file changed meanwhile
        self._store(self.folder / f"{hashing.hash.hexdigest()}.{reader}.v{FORMAT}", stored, path)
        return stored

    def _load(self, entry: Path, source: Path, consistent: Callable) -> Stored | None:
        """The entry's ids and memory-mapped arrays (copy on write), each checked against
        ``entry.json``; None when missing, or damaged (then removed, with one warning line)."""
        if not entry.is_dir():
            return None
        try:
            meta = json.loads((entry / ENTRY).read_bytes())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')}, expected {FORMAT}")
            raw_ids = (entry / IDS).read_bytes()
            if _digest(raw_ids) != meta["ids"]["xxh3"]:
                raise ValueError(f"{IDS}: checksum mismatch")
            ids = json.loads(raw_ids)
            if not (
                isinstance(ids, list)
                and len(ids) == meta["ids"]["count"]
                and all(isinstance(i, str) for i in ids)
            ):
                raise ValueError(f"{IDS}: not a list of {meta['ids']['count']} ids")
            arrays = {name: _loaded_array(entry, name, expected) for name, expected in meta["arrays"].items()}
            if not consistent(ids, arrays):
                raise ValueError("arrays inconsistent with the ids")
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
            if entry.is_dir():  # not just removed by another process
                _warn(f"{entry}: damaged feature-cache entry ({one_line(e)}); parsing {source} again")
                shutil.rmtree(entry, ignore_errors=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(entry / ENTRY)  # its last use, for the size bound
        self.used.add(entry.name)
        return ids, arrays

    def _store(self, entry: Path, stored: Stored, source: Path) -> None:
        """Write ``stored`` as ``entry`` (atomically: staged, then renamed), then keep the cache within
        its bound. A failure to write is one warning line: the evaluation goes on without it."""
        ids, arrays = stored
        if sum(array.nbytes for array in arrays.values()) > self.max_bytes:
            return  # larger than the whole cache
        staged = None
        try:
            staged = staging_dir(self.folder, "entry")
            raw_ids = json.dumps(ids).encode()
            with atomic_path(staged / IDS) as tmp:
                tmp.write_bytes(raw_ids)
            meta = {
                "format": FORMAT,
                "source": str(source),
                "ids": {"count": len(ids), "xxh3": _digest(raw_ids)},
            }
            meta["arrays"] = {}
            for name, array in arrays.items():
                array = np.ascontiguousarray(array)
                write_npy(staged / f"{name}.npy", array)
                meta["arrays"][name] = {
                    "shape": list(array.shape),
                    "dtype": array.dtype.str,
                    "xxh3": _digest(array),
                }
            write_json(staged / ENTRY, meta)
            os.rename(staged, entry)
        except OSError as e:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            if not entry.is_dir():  # else another process stored the same entry first: one is kept
                _warn(f"{entry}: could not store the parsed {source} ({one_line(e)}); going on without")
                return
        self.used.add(entry.name)
        self._evict()

    def _evict(self) -> None:
        """Remove the least recently used entries until the cache holds at most ``max_bytes``
        (never one this process has used)."""
        sized = []
        for entry in self.entries():
            with contextlib.suppress(OSError):  # removed meanwhile by another process
                files = list(entry.iterdir())
                last_use = (entry / ENTRY).stat().st_mtime
                sized.append((last_use, sum(f.stat().st_size for f in files), entry))
        total = sum(size for _, size, _ in sized)
        for _, size, entry in sorted(sized):
            if total <= self.max_bytes:
                break
            if entry.name not in self.used:
                shutil.rmtree(entry, ignore_errors=True)
                total -= size


def _loaded_array(entry: Path, name: str, expected: dict) -> np.ndarray:
    """``entry/NAME.npy`` memory-mapped copy-on-write (writable; the file is never changed), checked
    against its recorded shape, dtype and checksum; ``ValueError`` when it differs."""
    array = np.load(entry / f"{name}.npy", mmap_mode="c", allow_pickle=False)
    if list(array.shape) != expected["shape"] or array.dtype.str != expected["dtype"]:
        raise ValueError(f"{name}.npy: {array.dtype.str} {list(array.shape)}, expected {expected}")
    if _digest(array) != expected["xxh3"]:
        raise ValueError(f"{name}.npy: checksum mismatch")
    return array
