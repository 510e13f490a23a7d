"""Runs never lose results: a checkpoint at every epoch end, one last.ckpt, finished runs left alone,
the CSV history kept on resume, one process per run folder, evaluation outputs replaced as a set."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from io import StringIO as io_text
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from agree import atomic
from agree.atomic import replace_as_set, staging_dir
from agree.errors import ConfigError
from agree.evaluate import evaluate
from agree.report import write_report
from agree.train import train

from .test_resume import ENV, RUN, STEPS_PER_EPOCH, command, finish, generate_data, start

EPOCHS_ONLY = [o for o in RUN if not o.startswith(("checkpoint.", "trainer.max_epochs"))]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden staging folders excluded) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def rows(csv_text: str) -> list[dict[str, str]]:
    """The rows of a metrics.csv with their non-empty values (the columns grow as keys appear)."""
    return [{k: v for k, v in row.items() if v} for row in csv.DictReader(io_text(csv_text))]


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def kill_at_checkpoint(process: subprocess.Popen, last: Path, wanted) -> int:
    """SIGKILL ``process`` right after it writes a ``last`` whose step satisfies ``wanted``; return it."""
    seen, deadline = None, time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            inode = last.stat().st_ino if last.exists() else None
            if inode is not None and inode != seen:
                seen, step = inode, step_of(last)
                if wanted(step):
                    process.send_signal(signal.SIGKILL)
                    assert process.wait(timeout=30) == -signal.SIGKILL
                    return step
            time.sleep(0.005)
        raise AssertionError("the run ended before the wanted checkpoint")
    finally:
        if process.poll() is None:
            process.kill()


def test_kill_in_the_last_epoch_resumes_from_the_previous_epoch_end(tmp_path):
    """Row 5: without step checkpoints, last.ckpt is written at every epoch end (and no last-v1)."""
    run_dir = tmp_path / "run"
    generate_data(tmp_path)

    def run(*extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agree.train",
            *EPOCHS_ONLY,
            "trainer.max_epochs=3",
            f"data.root={tmp_path / 'scenes'}",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]

    process = subprocess.Popen(
        run(), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    step = kill_at_checkpoint(
        process, run_dir / "checkpoints" / "last.ckpt", lambda s: s == 2 * STEPS_PER_EPOCH
    )
    assert step == 2 * STEPS_PER_EPOCH  # the end of epoch 2, killed in epoch 3
    resumed = subprocess.run(
        run("ckpt_path=last"), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # the killed run's lock did not outlive it
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 3 * STEPS_PER_EPOCH
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def tiny_train(out: Path, data_root: Path, *extra: str):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(
            "train",
            [
                *EPOCHS_ONLY,
                "trainer.max_epochs=1",
                f"data.root={data_root}",
                f"output_dir={out}",
                *extra,
            ],
        )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run and the bytes of its folder."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    train(tiny_train(out, tmp / "scenes"))
    return tmp, out


def test_a_second_fresh_run_into_the_same_folder_is_refused(finished, tmp_path):
    """Row 6: never a versioned duplicate (``last-v1.ckpt``, ``best-v1.ckpt``) next to ``last.ckpt``
    and the best validation's ``best.ckpt``; a fresh run into a folder holding a run stops, and the
    folder stays byte-identical (issue 20, row 3: it used to truncate metrics.csv and replace last.ckpt)."""
    tmp, out = finished
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    again = tmp_path / "run"
    shutil.copytree(out, again)
    before = files(again)
    with pytest.raises(ConfigError, match="holds a run .*: resume it with ckpt_path=last, or start afresh"):
        train(tiny_train(again, tmp / "scenes"))
    assert files(again) == before


def test_resuming_a_finished_run_changes_nothing(finished):
    """Row 7: ``ckpt_path=last`` on a finished run stops with one line; files are byte-identical.
    Killed between the final checkpoint and metrics.json: the resume writes the same metrics.json."""
    tmp, out = finished
    before = files(out)
    assert json.loads(before["metrics.json"]) and "csv/metrics.csv" in before
    with pytest.raises(ConfigError, match="is finished"):
        train(tiny_train(out, tmp / "scenes", "ckpt_path=last"))
    assert files(out) == before

    (out / "metrics.json").unlink()
    metrics, _ = train(tiny_train(out, tmp / "scenes", "ckpt_path=last"))
    assert files(out) == before
    assert metrics == json.loads(before["metrics.json"])


def test_resume_after_a_kill_mid_epoch_keeps_the_csv_history(tmp_path):
    """Row 8: the validation rows of the epochs before the kill stay; the resumed history equals an
    uninterrupted run's."""
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    generate_data(tmp_path)
    uninterrupted = start(tmp_path, reference)
    process = start(tmp_path, crashed)
    step = kill_at_checkpoint(process, crashed / "checkpoints" / "last.ckpt", lambda s: s > STEPS_PER_EPOCH)
    assert step % STEPS_PER_EPOCH, f"not mid-epoch: step {step}"
    history = (crashed / "csv" / "metrics.csv").read_text()
    assert "val/rsum" in history.splitlines()[0]  # epoch 1's validation is on disk at the kill
    resuming = start(tmp_path, crashed, "ckpt_path=last")
    finish(uninterrupted, tmp_path, reference)
    finish(resuming, tmp_path, crashed)
    expected = (reference / "csv" / "metrics.csv").read_text()
    resumed = (crashed / "csv" / "metrics.csv").read_text()
    assert rows(resumed)[: len(rows(history))] == rows(history)  # the rows up to the checkpoint stay
    assert resumed == expected


def test_a_second_process_into_a_run_folder_in_use_stops_at_once(tmp_path):
    """Row 9: the second run stops with one line naming the first; the folder stays the first run's."""
    run_dir = tmp_path / "run"
    generate_data(tmp_path)
    first = start(tmp_path, run_dir, "trainer.max_epochs=100")  # still running when the second starts
    try:
        lock = run_dir / ".lock"
        deadline = time.monotonic() + 300  # the record is written once the first run's Trainer is built
        written = run_dir / ".hydra" / "config.yaml"
        while not (lock.exists() and lock.read_text() and written.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        config = written.read_bytes()
        second = subprocess.run(
            command(tmp_path, run_dir, "seed=7"),
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first.kill()
        first.wait(timeout=30)
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"error: {run_dir} is in use by pid {first.pid} on {os.uname().nodename}; "
        "wait for it to end or choose another folder"
    )
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config  # the first run's, untouched
    assert b"seed: 0" in config


# ---------------------------------------------------------------------------------------------
# evaluation outputs as a set


def evaluation(out: Path, scenes, *extra: str):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(
            "evaluate",
            ["data=flickr30k", f"data.root={scenes.root}", f"output_dir={out}", "rerank=tbr", *extra],
        )


def test_an_evaluation_killed_mid_write_leaves_the_previous_set(scenes, tmp_path, monkeypatch):
    """Row 10: a re-evaluation that dies while writing leaves the earlier outputs byte-identical,
    which the report renders; the next evaluation replaces them all and clears the leftovers."""
    out = tmp_path / "eval"
    first = evaluate(evaluation(out, scenes))
    write_report(out)
    before = files(out)

    calls = []

    def dies_on_the_third_file(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the predictions
        return atomic.write_jsonl(*args, **kwargs)

    monkeypatch.setattr("agree.data.evaluation_files.write_jsonl", dies_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        evaluate(evaluation(out, scenes, "seed=1"))
    assert files(out) == before
    assert write_report(out) and json.loads((out / "results.json").read_text()) == first

    monkeypatch.undo()
    dead = out / f".evaluate.{atomic.HOST}.{2**22 + 1}.staging"  # a killed evaluation's (pid above pid_max)
    dead.mkdir()
    second = evaluate(evaluation(out, scenes, "seed=1"))
    assert second != first and json.loads((out / "results.json").read_text()) == second
    assert not list(out.glob(".evaluate.*"))  # the killed runs' staging folders are gone
    assert (out / "features" / "images.npy").read_bytes() != before["features/images.npy"]


@pytest.mark.parametrize("fail_at", range(7))
def test_a_set_replaced_with_a_crash_at_any_rename_is_never_mixed(tmp_path, monkeypatch, fail_at):
    """Rows 10 and 12: whatever rename a crash stops at, ``results.json`` present means one set."""
    target = tmp_path / "out"
    names = ["a.json", "b", "results.json"]
    for generation, folder in (("old", target), ("new", None)):
        folder = folder or staging_dir(target, "test")
        (folder / "b").mkdir(parents=True)
        (folder / "b" / "x").write_text(generation)
        (folder / "a.json").write_text(generation)
        (folder / "results.json").write_text(generation)
    renames = []
    real = os.replace

    def crashing(src, dst):
        if len(renames) == fail_at:
            raise KeyboardInterrupt
        renames.append(dst)
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crashing)
    try:
        replace_as_set(folder, target, names, last="results.json")
    except KeyboardInterrupt:
        pass
    visible = {
        p: (target / p).read_text() for p in ("a.json", "b/x", "results.json") if (target / p).exists()
    }
    if "results.json" in visible:
        assert len(set(visible.values())) == 1 and len(visible) == 3, visible
    assert fail_at < 6 or visible == {"a.json": "new", "b/x": "new", "results.json": "new"}
