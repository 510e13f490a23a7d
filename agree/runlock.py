"""One process per output folder: a lock taken before anything is written into it.

The lock is a POSIX record lock (``fcntl.lockf``) on ``FOLDER/.lock``. The kernel releases it
when the process ends, however it ends, so a crash never leaves a stale lock; and unlike
``flock`` it belongs to the process, not to the open file, so a child process (a DataLoader or
parser worker, forked with the descriptor) never holds it, and cannot keep it after its parent is
killed. The file is opened without following a symbolic link and must be a regular file; it holds
the owner's host and pid, which a second process names when it stops. The other processes of one
distributed run (ranks above 0, started with the same folders) take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from agree.errors import FolderInUseError, FolderNotOwnedError

LOCK = ".lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")

# the folders this process holds: real path -> (descriptor, holders). A record lock is released by
# closing any descriptor of the file, so a folder is opened once, however many callers lock it.
_held: dict[str, tuple[int, int]] = {}


def is_first_process() -> bool:
    """Whether this is rank 0 of a distributed run (or not distributed at all)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def _open_lock_file(folder: Path) -> int:
    path = folder / LOCK
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FolderNotOwnedError(
                f"{path}: a symbolic link, not agree's lock file (agree makes none); remove it"
            ) from None
        if e.errno == errno.EISDIR:
            raise FolderNotOwnedError(f"{path}: a folder, not agree's lock file; remove it") from None
        raise FolderNotOwnedError(
            f"{folder}: cannot write here ({e.strerror}); choose a folder you can write"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FolderNotOwnedError(f"{path}: not a regular file, so not agree's lock file; remove it")
    return fd


def lock_folder(folder: str | os.PathLike) -> None:
    """Lock ``folder`` (made if missing) for this process; a second call from it only counts.

    Raises :class:`FolderInUseError` naming the holder when another live process has it, and
    :class:`FolderNotOwnedError` when ``FOLDER/.lock`` is not a regular file or cannot be written.
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        fd, holders = _held[key]
        _held[key] = fd, holders + 1
        return
    fd = _open_lock_file(folder)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FolderInUseError(
            f"{folder} is in use by {holder}; wait for it to end or choose another folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[key] = fd, 1


def unlock_folder(folder: str | os.PathLike) -> None:
    """Undo one ``lock_folder(folder)`` of this process; the last one releases the lock."""
    key = os.path.realpath(folder)
    fd, holders = _held.pop(key)
    if holders > 1:
        _held[key] = fd, holders - 1
    else:
        os.close(fd)


@contextlib.contextmanager
def locked(folders: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Hold the locks of ``folders`` (in this order) for the block; none is kept if one is refused."""
    taken: list[str | os.PathLike] = []
    try:
        for folder in folders:
            lock_folder(folder)
            taken.append(folder)
        yield
    finally:
        for folder in reversed(taken):
            unlock_folder(folder)
