"""Atomic file writing: a crash leaves the old file or the new one, never a partial one.

Every writer goes through :func:`atomic_path`: the data goes to a hidden temporary file beside
the target (``.NAME.HOST.PID.XXXXXXXX.tmp``), is flushed to disk, and is renamed over the target
(``os.replace``, atomic on POSIX within one filesystem). A process killed mid-write leaves only
such a temporary file; the next write of the same target removes the ones whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HOST = socket.gethostname().replace(os.sep, "_")
UMASK = os.umask(0o022)  # read once (os.umask can only read by setting); mkstemp makes 0600 files
os.umask(UMASK)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{HOST}."


# what a writer killed mid-way may leave: a temporary file (atomic_path), a staging folder
LEFTOVER = re.compile(r"\..+\.\d+\.(?:[a-z0-9_]+\.tmp|staging)")


def is_leftover(name: str) -> bool:
    """Whether the file or folder ``name`` is a temporary file or staging folder of these writers."""
    return LEFTOVER.fullmatch(name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` left by killed writers on this host; return them."""
    path = Path(path)
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"(\d+)\.[a-z0-9_]+\.tmp")
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A rewrite keeps the file's permissions, and a symlink stays a link: its target is rewritten.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~UMASK
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write one JSON document atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


# one encoder for every line: json.dumps with an option builds a new one a call
_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write one JSON object a line, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_LINE_ENCODER.encode(row) + "\n" for row in rows)


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz atomically (a file object keeps numpy from appending '.npz')."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one npy array atomically (memory-mappable with ``np.load(mmap_mode='r')``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def write_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically (Lightning checkpoints: see ``agree.train.AtomicCheckpointIO``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ---------------------------------------------------------------------------------------------
# sets of outputs


def staging_dir(target: str | os.PathLike, purpose: str) -> Path:
    """A fresh hidden folder inside ``target`` to write a set of outputs into (see ``replace_as_set``).

    Staging folders of killed processes (same ``purpose``, this host) are removed first.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(f".{purpose}.{HOST}.") + r"(\d+)\.staging")
    for leftover in target.glob(f".{glob.escape(purpose)}.*"):
        match = pattern.fullmatch(leftover.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(leftover, ignore_errors=True)
    staged = target / f".{purpose}.{HOST}.{os.getpid()}.staging"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    return staged


def replace_as_set(staged: Path, target: Path, names: Iterable[str], last: str) -> None:
    """Move the entries ``names`` (files or folders) of ``staged`` into ``target``, replacing the set.

    ``last`` is the entry readers check first (``results.json``): it leaves ``target`` first and
    arrives last, and every other old entry leaves before any new one arrives. A crash at any
    moment leaves the old set, the new set, or a set without ``last`` that readers refuse; never
    old and new entries side by side. Entries of the old set absent from the new one are removed.
    """
    others = [name for name in names if name != last]
    old = staged / ".replaced"
    old.mkdir()
    target.mkdir(parents=True, exist_ok=True)
    for name in [last, *others]:
        if (target / name).exists() or (target / name).is_symlink():
            os.replace(target / name, old / name)
    for name in [*others, last]:
        if (staged / name).exists():
            os.replace(staged / name, target / name)
    _fsync(target)
    shutil.rmtree(staged)
