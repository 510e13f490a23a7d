"""One process per run folder: a lock taken before Hydra writes anything into ``hydra.run.dir``.

The lock is ``fcntl.flock`` on ``RUN_DIR/.lock``: the kernel releases it when the process ends,
however it ends, so a crash never leaves a stale lock. The file holds the owner's host and pid,
which a second process names when it stops. The other processes of one distributed run (ranks
above 0, started with the same ``hydra.run.dir``) do not take it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

LOCK = ".lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_first_process() -> bool:
    """Whether this is rank 0 of a distributed run (or not distributed at all)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def lock_run_dir(run_dir: str | os.PathLike) -> int:
    """Lock ``run_dir`` for this process; return the open descriptor that holds the lock.

    Raises ``SystemExit`` with one line naming the holder when another live process has it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SystemExit(
            f"error: {run_dir} is in use by {holder}; wait for it to end or choose another hydra.run.dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


class RunDirLock(Callback):
    """Hydra callback: lock ``hydra.run.dir`` when a run starts (before ``.hydra/`` is written)."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_first_process():
            self.fd = lock_run_dir(config.hydra.run.dir)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
