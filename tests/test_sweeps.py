"""Sweeps as cluster users run them: Hydra's submitit launcher and the Optuna sweeper, on the tiny model."""

import json
import os
import subprocess
import sys

import yaml
from hydra import compose, initialize_config_module
from hydra.types import RunMode

from .test_progress_and_wandb import SCENES

QUICK = [
    "+experiment=demo",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
]


def agree_train(tmp_path, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "agree.train", *overrides]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_experiments_that_are_sweeps_run_as_sweeps():
    with initialize_config_module("agree.conf", version_base="1.3"):
        ablation = compose("train", ["+experiment=ablation"], return_hydra_config=True)
        search = compose("train", ["+hparams_search=scenes_optuna"], return_hydra_config=True)
    assert ablation.hydra.mode == RunMode.MULTIRUN and search.hydra.mode == RunMode.MULTIRUN
    assert "drop_loss" in ablation.hydra.sweeper.params
    assert set(search.hydra.sweeper.params) >= {"optim.lr", "losses.text_mask", "losses.ground_mask"}


def test_submitit_local_launcher_runs_a_two_job_sweep(scenes, tmp_path):
    sweep = tmp_path / "sweep"
    agree_train(
        tmp_path, "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "seed=0,1",
        *QUICK, f"data.root={scenes.root}", *SCENES,
    )  # fmt: skip
    for job in ("0", "1"):
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["seed"] == int(job)
        assert json.loads((sweep / job / "metrics.json").read_text())["val/rsum"] > 0
    assert any((sweep / ".submitit").iterdir())  # the jobs went through submitit


def test_optuna_sweeper_maximises_the_validation_rsum(scenes, tmp_path):
    sweep = tmp_path / "search"
    agree_train(
        tmp_path, "+hparams_search=scenes_optuna", "losses=agree", f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
        *QUICK, f"data.root={scenes.root}", *SCENES,
    )  # fmt: skip
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads((sweep / job / "metrics.json").read_text())["val/rsum"] for job in ("0", "1")]
    assert results["best_value"] == max(trials)
    assert set(results["best_params"]) == set(
        [
            "optim.lr",
            "losses.prompt",
            "losses.text_mask",
            "losses.vg_contrast",
            "losses.vg_mask",
            "losses.ground_mask",
        ]
    )
