"""What the kill tests wait on: a training run (a child process) marks each optimiser step it starts
in a file, and can stop at one of them until it is killed.

The tests add the callback on the command line (``marks(path, pause_at)``) and wait for the marks,
never for a span of time: a run stopped at step N has written every checkpoint of the steps before
N, and no later one, however slow the machine is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from .conftest import SUBPROCESS_LIMIT as LIMIT

PAUSED = "paused"


class StepMarks(Callback):
    """Appends ``global_step`` to ``path`` (one line, flushed) as each training batch starts; at
    step ``pause_at`` it appends ``paused`` and sleeps until the process is killed (or its parent,
    the test, is gone: then it exits, so no run is left behind).

    At the start of step N every checkpoint of steps 1..N is on disk: ``every_n_train_steps``
    ones are written at the end of their batch, epoch-end ones after validation.
    """

    def __init__(self, path: str, pause_at: int | None = None):
        self.path, self.pause_at = Path(path), pause_at
        self.parent = os.getppid()  # the test that started the run

    def _mark(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{text}\n")

    def on_train_batch_start(self, trainer, *args) -> None:
        self._mark(str(trainer.global_step))
        if trainer.global_step == self.pause_at:
            self._mark(PAUSED)
            while os.getppid() == self.parent:  # until killed; a run whose test is gone ends itself
                time.sleep(1)
            os._exit(1)


def marks(path: Path, pause_at: int | None = None) -> list[str]:
    """The command-line overrides that add ``StepMarks`` to a training run."""
    overrides = [f"+callbacks.step_marks._target_={__name__}.StepMarks", f"+callbacks.step_marks.path={path}"]
    return overrides + ([f"+callbacks.step_marks.pause_at={pause_at}"] if pause_at is not None else [])


def steps(path: Path) -> list[int]:
    """The steps a run marked, in order."""
    return [int(line) for line in path.read_text().split() if line != PAUSED]


def wait_for_pause(process: subprocess.Popen, path: Path) -> None:
    """Return once ``process`` has marked ``paused`` in ``path``; fail if it ends first."""
    deadline = time.monotonic() + LIMIT
    while not (path.exists() and PAUSED in path.read_text().split()):
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before its pause"
        assert time.monotonic() < deadline, f"no pause marked in {LIMIT} s"
        time.sleep(0.05)


def kill_when_paused(process: subprocess.Popen, path: Path) -> None:
    """SIGKILL ``process`` once it has marked ``paused`` in ``path``; fail if it ends first."""
    try:
        wait_for_pause(process, path)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=LIMIT) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
