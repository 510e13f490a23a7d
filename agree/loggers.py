"""A CSV logger whose history survives a resumed run (Lightning's deletes ``metrics.csv``)."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from agree.io import atomic_path


def history_rows(path: str | Path) -> int:
    """The number of rows (header excluded) of a ``metrics.csv``; 0 when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return max(sum(1 for _ in f) - 1, 0)


def keep_history(path: Path, rows: int) -> list[str]:
    """Cut ``metrics.csv`` to its header and first ``rows`` rows (bytes kept as they are; the file is
    left untouched when it has no more); return its columns. Values never span lines: numbers only."""
    with open(path, "rb") as f:
        lines = f.readlines()
    if len(lines) > rows + 1:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"".join(lines[: rows + 1]))
    return next(csv.reader([lines[0].decode()])) if lines else []


class _HistoryWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_rows: int) -> None:
        self.keep_rows = keep_rows
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the base __init__, instead of deleting the file
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if not self.keep_rows:
            path.unlink()
            return
        self.metrics_keys = keep_history(path, self.keep_rows)  # appended rows use the same columns


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the first ``keep_rows`` rows of an existing ``metrics.csv`` and appends.

    A resumed run passes the number of rows its checkpoint was written after (see
    ``agree.train.LastCheckpoint``): the history up to the checkpoint stays, rows logged after it
    (which the resumed run logs again) go. A fresh run (``keep_rows=0``) starts a new file.
    """

    def __init__(self, *args, keep_rows: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_rows = keep_rows

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self.keep_rows)
        return self._experiment
