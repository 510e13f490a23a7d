"""Loader workers die with the command that started them (issue 20, deliverable 3): ``kill -9`` of
the command leaves no child alive 3 s later, and the run folder's lock goes with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_feature_cache import _alive, _descendants

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")

LOADER = """
import sys, time, torch
from agree.workers import die_with_parent
if sys.argv[1] == "registered":
    die_with_parent()

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        time.sleep(30)  # a worker busy loading: torch's own check of the parent comes only after it
        return i

for batch in torch.utils.data.DataLoader(Slow(), num_workers=2):
    pass
"""


def _workers_of(process: subprocess.Popen, count: int, timeout: float = 900) -> set[int]:
    """The ``count`` children of ``process`` once they run (generous: a shared machine is slow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if len(children := _descendants(process.pid)) >= count:
            return children
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"no {count} workers started: {process.communicate()[1][-2000:]}")


def _kill_and_wait(process: subprocess.Popen, workers: set[int]) -> list[int]:
    """``kill -9`` the command; the workers still alive 3 s later (each then killed here)."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(3)
    alive = [pid for pid in workers if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


@pytest.mark.parametrize("registered", [True, False])
def test_dataloader_workers_die_with_their_killed_parent(registered) -> None:
    """``registered=False`` shows the problem: without the hook the busy workers outlive it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", LOADER, "registered" if registered else "plain"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = _workers_of(process, 2)
    alive = _kill_and_wait(process, workers)
    assert (alive == []) == registered, alive


def test_kill_9_of_an_evaluation_with_loader_workers_leaves_none(tmp_path) -> None:
    """The real command: ``agree.evaluate`` extracting features with ``data.num_workers=2``."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "agree.evaluate", f"hydra.run.dir={run_dir}", f"output_dir={tmp_path / 'out'}",
        f"data.root={tmp_path / 'scenes'}", "data.synthetic.train_images=4", "data.synthetic.val_images=2",
        "data.synthetic.test_images=30", "data.synthetic.vg_images_per_word=1", "data.num_workers=2",
        "batch_size=1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers = _workers_of(process, 2)
    assert _kill_and_wait(process, workers) == []
    rerun = [*command[:-2], "data.num_workers=0"]  # the same run folder, lighter
    again = subprocess.run(rerun, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]  # not refused: no worker kept the lock
