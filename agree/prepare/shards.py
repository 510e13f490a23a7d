"""Resumable work in shards: finished shards are kept on disk and skipped when a step runs again.

A step cuts its items into shards of ``size``; each shard's result (JSON rows and named groups of
arrays) is written atomically under ``<output>.parts/`` as ``shard-00012.<group>.npz`` files and
then ``shard-00012.jsonl``, which marks the shard finished. ``manifest.json`` holds a digest of
the items and the step's parameters: parts made from other inputs or settings are discarded.
Once every shard is done, the step merges them into its outputs (atomically) and removes the
parts folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from tqdm.auto import tqdm

from agree.atomic import atomic_path, write_json, write_jsonl, write_npz
from agree.errors import ConfigError
from agree.progress import interactive

T = TypeVar("T")


@dataclass
class ShardResult:
    """What one shard produced: rows (in item order) and arrays per output group."""

    rows: list[dict] = field(default_factory=list)
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Shards(Generic[T]):
    """``items`` cut into shards of ``size``, with their finished results under ``<output>.parts``."""

    def __init__(self, output: str | Path, items: Sequence[T], size: int, params: dict):
        if size < 1:
            raise ConfigError(f"shard_size must be at least 1, got {size}")
        output = Path(output)
        self.parts = output.parent / f"{output.name}.parts"
        self.items, self.size = items, size
        self.count = -(-len(items) // size)
        manifest = {"items": digest(list(items)), "params": params, "shard_size": size}
        manifest_path = self.parts / "manifest.json"
        if manifest_path.is_file() and json.loads(manifest_path.read_text()) != manifest:
            print(f"{self.parts}: made from other inputs or settings; starting over", file=sys.stderr)
            shutil.rmtree(self.parts)
        if not manifest_path.is_file():
            write_json(manifest_path, manifest)

    def _path(self, index: int, suffix: str) -> Path:
        return self.parts / f"shard-{index:05d}{suffix}"

    def _chunk(self, index: int) -> Sequence[T]:
        return self.items[index * self.size : (index + 1) * self.size]

    def done(self, index: int) -> bool:
        return self._path(index, ".jsonl").is_file()

    def _write(self, index: int, result: ShardResult) -> None:
        for group, arrays in result.arrays.items():
            write_npz(self._path(index, f".{group}.npz"), arrays)
        write_jsonl(self._path(index, ".jsonl"), result.rows)  # written last: marks the shard done

    def run(self, work: Callable[[Sequence[T]], ShardResult], desc: str, unit: str) -> None:
        """Compute and store every unfinished shard, with a progress bar on a terminal."""
        todo = [i for i in range(self.count) if not self.done(i)]
        finished = len(self.items) - sum(len(self._chunk(i)) for i in todo)
        with tqdm(
            total=len(self.items), initial=finished, desc=desc, unit=unit, disable=not interactive()
        ) as bar:
            for index in todo:
                self._write(index, work(self._chunk(index)))
                bar.update(len(self._chunk(index)))

    def rows(self) -> Iterator[dict]:
        """The rows of all shards, in item order."""
        for index in range(self.count):
            with open(self._path(index, ".jsonl"), encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    def merge_npz(self, group: str, path: str | Path) -> int:
        """Stream the ``group`` arrays of all shards into one npz at ``path``; return their count.

        Members are copied zip to zip, so memory stays at one array whatever the total size.
        """
        count = 0
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
            for index in range(self.count):
                shard = self._path(index, f".{group}.npz")
                if not shard.is_file():
                    continue
                with zipfile.ZipFile(shard) as source:
                    for info in source.infolist():
                        with source.open(info) as src, out.open(info.filename, "w", force_zip64=True) as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        count += 1
        return count

    def remove(self) -> None:
        """Delete the parts folder (after the outputs are written)."""
        shutil.rmtree(self.parts, ignore_errors=True)
