"""Kill a training run with SIGKILL mid-epoch, resume it with ``ckpt_path=last``: same final weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from agree.config import ensure_data
from agree.data.datamodule import EpochSampler, ResumableLoader

from .step_marks import LIMIT, kill_when_paused, marks, steps

STEPS_PER_EPOCH = 5  # 20 images x 2 captions, batches of 8
RUN = [
    "+experiment=demo",
    "data.synthetic.train_images=20",
    "data.synthetic.val_images=8",
    "data.synthetic.test_images=8",
    "data.synthetic.vg_images_per_word=1",
    "data.synthetic.captions_per_image=2",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_train_steps=3",  # 3, 6, 9, and the final step 10 (FinalCheckpoint)
]
FIRST_CHECKPOINT = 3
REPO = Path(__file__).resolve().parents[1]
# one thread each: two runs share the 2 cores without oversubscription, and every run reduces in
# the same order; the runs import the callback of tests/step_marks.py
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "PYTHONWARNINGS": "ignore",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
}


def command(tmp_path: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agree.train",
        *RUN,
        f"data.root={tmp_path / 'scenes'}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def start(tmp_path: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    with open(tmp_path / f"{run_dir.name}.log", "a") as log:
        return subprocess.Popen(
            command(tmp_path, run_dir, *extra), cwd=tmp_path, env=ENV, stdout=log, stderr=log
        )


def finish(process: subprocess.Popen, tmp_path: Path, run_dir: Path) -> None:
    code = process.wait(timeout=LIMIT)
    assert code == 0, (tmp_path / f"{run_dir.name}.log").read_text()[-3000:]


def generate_data(tmp_path: Path) -> None:
    """The runs' dataset, generated once up front so that two runs can start together."""
    with initialize_config_module("agree.conf", version_base="1.3"):
        cfg = compose("train", [*RUN, f"data.root={tmp_path / 'scenes'}", "output_dir=unused"])
    ensure_data(cfg.data)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    generate_data(tmp_path)
    uninterrupted = start(tmp_path, reference)
    killed, resumed_steps = tmp_path / "killed.steps", tmp_path / "resumed.steps"
    kill_when_paused(start(tmp_path, crashed, *marks(killed, pause_at=FIRST_CHECKPOINT)), killed)

    at_kill = load(crashed / "checkpoints" / "last.ckpt")
    assert at_kill["global_step"] == FIRST_CHECKPOINT < STEPS_PER_EPOCH  # mid-epoch
    assert steps(killed) == list(range(FIRST_CHECKPOINT + 1))
    assert not (crashed / "metrics.json").exists()

    resuming = start(tmp_path, crashed, "ckpt_path=last", *marks(resumed_steps))
    finish(uninterrupted, tmp_path, reference)
    finish(resuming, tmp_path, crashed)
    # the resumed process starts at its checkpoint: it never runs the steps before it again
    assert steps(resumed_steps) == list(range(FIRST_CHECKPOINT, 2 * STEPS_PER_EPOCH))

    expected = load(reference / "checkpoints" / "last.ckpt")
    resumed = load(crashed / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == expected["global_step"] == 2 * STEPS_PER_EPOCH
    assert expected["state_dict"].keys() == resumed["state_dict"].keys()
    for name, weight in expected["state_dict"].items():
        assert torch.equal(weight, resumed["state_dict"][name]), name
    for name, state in expected["optimizer_states"][0]["state"].items():
        assert all(torch.equal(v, resumed["optimizer_states"][0]["state"][name][k]) for k, v in state.items())
    assert expected["lr_schedulers"] == resumed["lr_schedulers"]
    assert not list((crashed / "checkpoints").glob(".*.tmp"))  # the killed writer's leftovers are gone


class Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, key):
        return torch.tensor(key)


def epoch_batches(loader: ResumableLoader, epoch: int) -> list[list]:
    loader.sampler.set_epoch(epoch)
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("consumed", [1, 2, 3])
def test_loader_state_skips_the_consumed_batches_of_its_epoch(consumed):
    def make():
        return ResumableLoader(Items(), batch_size=4, sampler=EpochSampler(Items(), seed=7), drop_last=True)

    whole = make()
    reference = [epoch_batches(whole, 0), epoch_batches(whole, 1)]
    assert reference[0] != reference[1]  # a new permutation per epoch, as (index, epoch) keys
    assert all(epoch == e for e, batches in enumerate(reference) for b in batches for _, epoch in b)

    interrupted = make()
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator).tolist() for _ in range(consumed)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": consumed}

    resumed = make()
    resumed.load_state_dict(state)
    assert seen + epoch_batches(resumed, 1) == reference[1]
    assert epoch_batches(resumed, 2) == epoch_batches(make(), 2)  # later epochs: from the start
