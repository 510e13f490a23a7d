"""W&B runs as sweep users expect: grouped by sweep, named by overrides, tagged, resumed with the training."""

import json
import re

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from agree.loggers import WANDB_RUN_FILE, wandb_settings
from agree.train import train

from .test_progress_and_wandb import SCENES, finished_wandb_records


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key of the machine's user


def test_sweep_job_is_grouped_named_and_tagged(tmp_path, offline_wandb):
    """Under `-m`, the group is the sweep folder and the name the job's overrides (paths left out)."""
    overrides = ["logger=wandb", "losses=agree", "losses.vg_mask=0", "seed=3", f"output_dir={tmp_path}"]
    with initialize_config_module("agree.conf", version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = "multirun/ablation/2026-01-01/10-00-00"
        cfg.hydra.overrides.task = overrides
    HydraConfig.instance().set_config(cfg)
    try:
        settings = wandb_settings(cfg, {"offline": None, "group": None, "name": None, "tags": None})
    finally:
        HydraConfig.instance().cfg = None
    assert settings["offline"] is True  # no key anywhere: offline, nothing prompts
    assert settings["group"] == "multirun/ablation/2026-01-01/10-00-00"
    assert settings["name"] == "losses=agree,losses.vg_mask=0,seed=3"
    tags = settings["tags"]
    assert tags == [
        "method:agree",
        "losses:clip+prompt+text_mask+vg_contrast+ground_mask",
        "model:agree-tiny",
    ]
    assert json.loads((tmp_path / WANDB_RUN_FILE).read_text())["id"] == settings["id"]


def test_values_set_in_the_config_win(tmp_path, offline_wandb):
    with initialize_config_module("agree.conf", version_base="1.3"):
        cfg = compose("train", ["logger=wandb", f"output_dir={tmp_path}"])
    given = {"offline": True, "group": "g", "name": "n", "tags": ["t"], "id": "abc"}
    assert wandb_settings(cfg, given) == {}
    assert not (tmp_path / WANDB_RUN_FILE).exists()


def run_records(run_dir):
    run_id = json.loads((run_dir / WANDB_RUN_FILE).read_text())["id"]
    run = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))[-1]
    return finished_wandb_records(next(run.glob("run-*.wandb")))


class CrashAt(Callback):
    """Fails the training at global step ``step``, after that step's checkpoint (a crash)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def test_resumed_training_continues_the_same_wandb_run(scenes, tmp_path, offline_wandb):
    """`ckpt_path=last` after a crash logs into the interrupted training's W&B run, not a new one."""
    import wandb

    def run(*extra):
        with initialize_config_module("agree.conf", version_base="1.3"):
            cfg = compose(
                "train",
                ["+experiment=demo", "logger=wandb", f"output_dir={tmp_path / 'run'}",
                 f"data.root={scenes.root}", *SCENES, "trainer.log_every_n_steps=1", "trainer.max_steps=4",
                 "checkpoint.every_n_train_steps=2", "+trainer.limit_val_batches=1", *extra],
            )  # fmt: skip
        try:
            train(cfg)
        finally:
            wandb.finish()
        return json.loads((tmp_path / "run" / WANDB_RUN_FILE).read_text())["id"]

    with pytest.raises(RuntimeError, match="crash"):
        run(f"+callbacks.crash._target_={__name__}.CrashAt", "+callbacks.crash.step=2")
    first = json.loads((tmp_path / "run" / WANDB_RUN_FILE).read_text())["id"]
    second = run("ckpt_path=last")
    assert first == second
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # W&B names a run's folder offline-run-DATE_TIME-ID, with "-1" added when both start in one second
    folder = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?")
    assert len(runs) == 2 and all(folder.fullmatch(r.name) for r in runs)
    config = {u.key for r in run_records(tmp_path / "run") if r.HasField("config") for u in r.config.update}
    assert {"losses", "optim", "model", "data", "trainer"} <= config  # the resolved config is attached
