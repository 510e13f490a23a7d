"""Folders we did not make, finished runs, locks and the checks before any work (issue 20, part A).

A user's folder, a data root, a finished run and a lock path are compared byte for byte before
and after each refused command; the Hydra paths run as real processes.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from agree import demo
from agree.data.synthetic import OWNER, SceneConfig, contents
from agree.errors import ConfigError, FolderInUseError, FolderNotOwnedError
from agree.evaluate import evaluate
from agree.folders import MARKER, claim
from agree.runlock import LOCK, lock_folder, unlock_folder
from agree.settings import evaluate_settings, train_settings
from agree.train import train

from .test_inputs_read_only import files
from .test_progress_and_wandb import SCENES
from .test_resume import ENV, RUN, STEPS_PER_EPOCH, command, generate_data
from .test_run_safety import rows

REPO = Path(__file__).resolve().parents[1]


def config(name: str, *overrides: str):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(name, list(overrides))


def without_lock(found: dict[str, bytes]) -> dict[str, bytes]:
    """The files of a folder but its lock file, whose text names the last process that took it."""
    return {name: data for name, data in found.items() if Path(name).name != LOCK}


def no_work(monkeypatch) -> None:
    """Fail the test if an evaluation starts reading its data."""

    def started(*args, **kwargs):
        raise AssertionError("the evaluation started working")

    monkeypatch.setattr("agree.evaluate.load_test_set", started)


def starts(text: str) -> str:
    """A ``pytest.raises(match=...)`` pattern: the message starts with ``text``."""
    return "^" + re.escape(text)


def one_line_exit(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr[-3000:]
    return done.stderr.strip()


@pytest.fixture
def data_root(scenes, tmp_path):
    """A user's release folder (the scenes files without the project's marker)."""
    root = tmp_path / "REAL"
    shutil.copytree(scenes.root, root)
    (root / MARKER).unlink()
    return root


# ---------------------------------------------------------------------------------------------
# row 1: a folder is ours only if we made it


def test_evaluate_refuses_a_users_folder_and_the_data_root_before_any_work(data_root, tmp_path, monkeypatch):
    """``output_dir`` = a user's non-empty folder, a link to the data root, a new folder inside it:
    one line each before any work; nothing written, no marker."""
    mine = tmp_path / "mine"
    (mine / "annotation").mkdir(parents=True)
    (mine / "annotation" / "flickr30k_test_texts.jsonl").write_text('{"query_id": 0}\n')
    (mine / "images.npz").write_bytes(b"npz")
    (mine / "notes.txt").write_text("years of work")
    (tmp_path / "link").symlink_to(data_root)
    before = {folder: files(folder) for folder in (mine, data_root)}
    no_work(monkeypatch)
    data = ["data=flickr30k", f"data.root={data_root}"]
    for output_dir, message in (
        (mine, f"{mine}: not empty and not made by agree evaluate"),
        (tmp_path / "link", f"output_dir={tmp_path / 'link'} lies in data.root={data_root}"),
        (data_root / "eval", f"output_dir={data_root / 'eval'} lies in data.root={data_root}"),
    ):
        with pytest.raises(FolderNotOwnedError, match=starts(message)):
            evaluate(config("evaluate", *data, f"output_dir={output_dir}"))
    assert {folder: files(folder) for folder in (mine, data_root)} == before
    assert not (data_root / "eval").exists()


def test_an_evaluation_writes_into_a_new_folder_and_its_own_again(scenes, tmp_path):
    """The folder it made is marked (no contents: make clean keeps evaluations); a rerun replaces
    its set."""
    out = tmp_path / "eval"
    overrides = [f"data.root={scenes.root}", *SCENES, f"output_dir={out}"]
    first = evaluate(config("evaluate", *overrides))
    assert json.loads((out / MARKER).read_text()) == {"owner": "evaluate", "params": {}}
    assert evaluate(config("evaluate", *overrides, "seed=1")) != first


def test_make_clean_removes_only_marked_folders_holding_nothing_else(tmp_path):
    """Row 1's ``make clean``: a folder the demo or the generator made goes only if every file in it
    is one they write there; anything else keeps it, named; evaluations and users' folders stay."""
    demo_files = [
        "summary.json",
        "train/checkpoints/last.ckpt",
        "train/csv/metrics.csv",
        "zero_shot/tbr/features/images.npy",
        "zero_shot/tbr/results.json",
        "fine_tuned/results.json",
        "fine_tuned/report.html",
        f"fine_tuned/{MARKER}",
    ]

    def made(folder: Path, owner: str, names: list[str], patterns=()) -> None:
        claim(folder, owner, contents=patterns)
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"ours")

    made(tmp_path / "outputs" / "demo", "demo", demo_files, demo.CONTENTS)
    made(tmp_path / "data" / "demo-with-notes", "demo", [*demo_files, "fine_tuned/notes.txt"], demo.CONTENTS)
    scenes = tmp_path / "data" / "scenes"
    generated = contents(SceneConfig().layout(scenes))
    made(scenes, OWNER, [*generated, "annotation/mine.txt"], generated)
    made(tmp_path / "data" / "evaluated", "evaluate", ["results.json"])
    (tmp_path / "data" / "mine" / "annotation").mkdir(parents=True)
    (tmp_path / "data" / "mine" / "annotation" / "flickr30k_test_texts.jsonl").write_text("{}")
    linked = tmp_path / "data" / "linked"
    made(linked, "demo", ["summary.json"], demo.CONTENTS)
    (linked / "fine_tuned").symlink_to(tmp_path / "data" / "mine")
    before = files(tmp_path)
    done = subprocess.run(
        ["make", "-s", "-f", str(REPO / "Makefile"), "clean", f"PY={sys.executable}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert "removed outputs/demo" in printed
    assert "kept data/demo-with-notes (it holds files agree did not write there: fine_tuned/notes.txt;" in (
        done.stdout
    )
    assert "kept data/scenes (it holds files agree did not write there: annotation/mine.txt;" in done.stdout
    assert "kept data/evaluated (made by agree evaluate, whose outputs are kept)" in printed
    assert "kept data/mine (not made by agree)" in printed
    assert "kept data/linked (it holds files agree did not write there: fine_tuned;" in done.stdout
    assert files(tmp_path) == {k: v for k, v in before.items() if not k.startswith("outputs/demo/")}


# ---------------------------------------------------------------------------------------------
# rows 2 and 3: a finished run's files are never replaced by a refused or mistaken command


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run of ``python -m agree.train`` (a real Hydra run) and its folder's bytes."""
    tmp = tmp_path_factory.mktemp("finished")
    generate_data(tmp)
    run_dir = tmp / "run"
    done = subprocess.run(
        command(tmp, run_dir, "trainer.max_epochs=1"), cwd=tmp, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"} <= set(files(run_dir))
    return tmp, run_dir


@pytest.mark.parametrize(
    "extra, message",
    [
        (  # row 2: refused after its checks; Hydra used to rewrite .hydra/ first
            ["ckpt_path=last", "optim.lr=0.5", "seed=7"],
            "config error: ckpt_path=last: the run in {run} is finished",
        ),
        (["ckpt_path=last", "optim.lr=-1"], "config error: optim.lr=-1"),  # refused by the config checks
        (  # row 3: without ckpt_path=last it used to truncate metrics.csv and replace last.ckpt
            ["seed=7"],
            "config error: {run} holds a run (checkpoints/last.ckpt): resume it with ckpt_path=last, "
            "or start afresh in a new folder (another hydra.run.dir, or output_dir)",
        ),
    ],
)
def test_a_refused_command_leaves_a_finished_run_byte_identical(finished_run, extra, message):
    tmp, run_dir = finished_run
    before = files(run_dir)
    done = subprocess.run(
        command(tmp, run_dir, "trainer.max_epochs=1", *extra),
        cwd=tmp,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one_line_exit(done).startswith(message.format(run=run_dir))
    assert without_lock(files(run_dir)) == without_lock(before)  # .hydra/*.yaml, metrics.csv, last.ckpt
    assert b"lr: 0.001" in before[".hydra/config.yaml"] and b"seed: 0" in before[".hydra/config.yaml"]


# ---------------------------------------------------------------------------------------------
# row 4: a resumed run keeps every CSV row on disk for the steps it keeps

KILLED_AT = 3  # SIGKILL while writing the checkpoint of this step: last.ckpt on disk holds step 2
KILL_WHILE_SAVING = f"""
import os, signal, sys
import agree.train as train
save = train.AtomicCheckpointIO.save_checkpoint
def killed(self, checkpoint, path, storage_options=None):
    if checkpoint["global_step"] == {KILLED_AT}:  # the loggers were flushed just before
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, checkpoint, path, storage_options)
train.AtomicCheckpointIO.save_checkpoint = killed
sys.argv = ["agree.train", *sys.argv[1:]]
train.main()
"""


def history(csv_text: str) -> list[tuple[int, str]]:
    """(step, the row's kind: train, lr or val) of each row of a metrics.csv."""
    out = []
    for row in rows(csv_text):
        kind = "val" if "val/rsum" in row else "train" if "train/loss" in row else "lr"
        out.append((int(row["step"]), kind))
    return out


def test_a_resumed_run_keeps_the_rows_of_the_steps_it_keeps(tmp_path):
    """``every_n_train_steps=1``: the training loss of the checkpointed step is logged after its
    checkpoint; killed once that row is on disk, the resume keeps it (it used to be cut and never
    logged again) and logs every later step once."""
    generate_data(tmp_path)
    run_dir = tmp_path / "run"
    steps = ["trainer.max_epochs=1", "checkpoint.every_n_train_steps=1", "trainer.log_every_n_steps=1"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_WHILE_SAVING, *command(tmp_path, run_dir, *steps)[3:]],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    at_kill = (run_dir / "csv" / "metrics.csv").read_text()
    assert (KILLED_AT - 2, "train") in history(at_kill)  # the row of step 1, written after checkpoint 2
    assert (KILLED_AT - 1, "train") not in history(at_kill)
    resumed = subprocess.run(
        command(tmp_path, run_dir, *steps, "ckpt_path=last"),
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = (run_dir / "csv" / "metrics.csv").read_text()
    kept = [row for row in rows(at_kill) if int(row["step"]) < KILLED_AT - 1]
    assert rows(final)[: len(kept)] == kept  # every value, in their order (new columns aside)
    logged = history(final)
    for kind in ("train", "lr"):
        assert [step for step, k in logged if k == kind] == list(range(STEPS_PER_EPOCH)), (kind, logged)
    assert [step for step, k in logged if k == "val"] == [STEPS_PER_EPOCH - 1]


# ---------------------------------------------------------------------------------------------
# rows 8 and 10: the lock covers every output folder; it is a regular file, never followed

HOLD = """
import sys, time
from agree.runlock import lock_folder
lock_folder(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another live process holds."""
    folder = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield folder, holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_lock_covers_output_dir(held, scenes, tmp_path, monkeypatch):
    """Row 8: an evaluation or a training writing into an ``output_dir`` another process holds
    stops (their run folders differ); the folder is unchanged."""
    folder, pid = held
    before = files(folder)
    no_work(monkeypatch)
    in_use = starts(f"{folder} is in use by pid {pid} on {os.uname().nodename}; wait for it to end")
    with pytest.raises(FolderInUseError, match=in_use):
        evaluate(config("evaluate", f"data.root={scenes.root}", *SCENES, f"output_dir={folder}"))
    with pytest.raises(FolderInUseError, match=in_use):
        train(config("train", *RUN, f"data.root={tmp_path / 'scenes'}", f"output_dir={folder}"))
    assert files(folder) == before


def test_a_lock_path_that_is_not_a_regular_file_is_refused(tmp_path):
    """Row 10: a link is not followed (its target is not truncated); a folder or a FIFO is refused."""
    target = tmp_path / "precious.txt"
    target.write_text("years of work")
    cases = {"link": "a symbolic link", "folder": "a folder", "fifo": "not a regular file"}
    for name in cases:
        (tmp_path / name).mkdir()
    (tmp_path / "link" / LOCK).symlink_to(target)
    (tmp_path / "folder" / LOCK).mkdir()
    os.mkfifo(tmp_path / "fifo" / LOCK)
    for name, message in cases.items():
        with pytest.raises(FolderNotOwnedError, match=starts(f"{tmp_path / name / LOCK}: {message}")):
            lock_folder(tmp_path / name)
    assert target.read_text() == "years of work"


def test_a_run_folder_whose_lock_is_a_folder_stops_the_command(tmp_path):
    """Row 10 through Hydra: the error is one line and exit code 1, not a warning and a second run."""
    run_dir = tmp_path / "run"
    (run_dir / LOCK).mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "agree.train", "+experiment=demo", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one_line_exit(done) == f"error: {run_dir / LOCK}: a folder, not agree's lock file; remove it"
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]


FORKS = """
import os, sys, time
from agree.runlock import lock_folder
lock_folder(sys.argv[1])
child = os.fork()
if child == 0:
    time.sleep(120)  # a worker, forked with the lock file's descriptor
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_forked_worker_never_holds_the_lock(tmp_path):
    """Deliverable 3: kill -9 the command; its forked worker lives on, yet the folder is free."""
    folder = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-c", FORKS, str(folder)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert Path(f"/proc/{child}").exists()  # the worker outlived it
        lock_folder(folder)  # used to be refused: "in use by pid <dead pid>"
        unlock_folder(folder)
    finally:
        os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# rows 12, 13, 15: values checked before any work


@pytest.mark.parametrize("key", ["seed", "data.synthetic.seed"])
@pytest.mark.parametrize("value", [-1, 2**32])
def test_seeds_outside_lightnings_range_are_config_errors(tmp_path, key, value):
    """Row 12: training and evaluation name the key and the range."""
    message = f"^{key}={value}: a seed is an integer from 0 to 4294967295$"
    with pytest.raises(ConfigError, match=message):
        train_settings(config("train", *RUN, f"output_dir={tmp_path}", f"{key}={value}"))
    with pytest.raises(ConfigError, match=message):
        evaluate_settings(config("evaluate", f"output_dir={tmp_path}", f"{key}={value}"))


def test_a_seed_outside_the_range_is_one_line_on_the_command_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agree.train",
            "+experiment=demo",
            "seed=-1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one_line_exit(done) == "config error: seed=-1: a seed is an integer from 0 to 4294967295"


def test_a_batch_larger_than_the_training_set_is_a_config_error(scenes, tmp_path):
    """Row 13: batches are full (drop_last), so such a run would train nothing; the largest batch
    that fits is accepted."""
    small = [
        *RUN,
        "data.synthetic.train_images=10",
        "data.synthetic.captions_per_image=2",
        f"output_dir={tmp_path}",
    ]
    with pytest.raises(
        ConfigError, match=starts("data.batch_size=21: the training set has 20 captions (data.synthetic: ")
    ):
        train_settings(config("train", *small, "data.batch_size=21"))
    assert train_settings(config("train", *small, "data.batch_size=20")).cfg.data.batch_size == 20
    release = ["data=flickr30k", f"data.root={scenes.root}", f"output_dir={tmp_path}", "data.batch_size=301"]
    records = scenes.train_records
    with pytest.raises(
        ConfigError, match=starts(f"data.batch_size=301: the training set has 300 captions ({records})")
    ):
        train_settings(config("train", *release))
    with pytest.raises(ConfigError, match="^data.global_batch_size=302: the training set has 300 captions"):
        train_settings(config("train", *release, "+data.global_batch_size=302"))


def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_any_work(scenes, tmp_path, monkeypatch):
    """Row 15: a file (it used to fail after all the work), a name over 255 bytes."""
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    no_work(monkeypatch)
    overrides = [f"data.root={scenes.root}", *SCENES]
    for output_dir, message in (
        (existing, f"{existing} is a file, not a folder"),
        (tmp_path / ("x" * 300), f"the name {'x' * 40}... is longer than 255 bytes"),
        (existing / "eval", f"{existing} is a file, not a folder"),
    ):
        with pytest.raises(ConfigError, match=starts(f"output_dir={output_dir}: {message}")):
            evaluate(config("evaluate", *overrides, f"output_dir={output_dir}"))
    assert existing.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path):
    """Row 15: ``hydra.run.dir=/sys/x`` (a PermissionError traceback from Hydra before)."""
    done = subprocess.run(
        [sys.executable, "-m", "agree.evaluate", "hydra.run.dir=/sys/agree-run"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_line_exit(done)
    assert "/sys" in line and ("cannot write here" in line or "not writable" in line), line
    assert not Path("/sys/agree-run").exists()
