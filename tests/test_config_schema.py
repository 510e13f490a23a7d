"""The configuration is checked once, against its schema, before any work: each bad value is one
line naming its key, raised before a model is built or a file is written."""

import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from agree.evaluate import evaluate
from agree.schema import EvaluateConfig, TrainConfig
from agree.settings import train_settings, typed
from agree.train import train

from .conftest import SUBPROCESS_LIMIT
from .test_config_errors import config, fails

CONF = Path(__file__).resolve().parents[1] / "agree" / "conf"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "CI": "true"}


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: every check must come first."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(open_clip, "create_model", built)


def refused(run, cfg, tmp_path, *fragments):
    """``run(cfg)`` raises one line holding ``fragments``, writes no output and generates no data."""
    fails(run, cfg, *fragments)
    assert not (tmp_path / "scenes").exists()


def train_config(tmp_path, *overrides, experiment="demo"):
    return config(
        "train",
        f"+experiment={experiment}",
        f"output_dir={tmp_path / 'run'}",
        f"data.root={tmp_path / 'scenes'}",
        *overrides,
    )


def evaluate_config(tmp_path, *overrides):
    return config(
        "evaluate", f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'scenes'}", *overrides
    )


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("optim.lr=fast", ["optim.lr=fast", "could not be converted to Float"]),
        ("optim.lr=-1", ["optim.lr=-1", "must be > 0"]),
        ("trainer.max_epochs=abc", ["trainer.max_epochs=abc", "could not be converted to Integer"]),
        ("trainer.max_epochs=-2", ["trainer.max_epochs=-2", "at least 1, or -1"]),
        ("optim.warmup_steps=-5", ["optim.warmup_steps=-5", "at least 0"]),
        ("model.image_size=32", ["model.name=agree-tiny takes 64-px images", "model.image_size=32"]),
        ("+foo=1", ["foo is not a setting"]),
        (
            "+trainer.limit_predict_batches=2",
            ["trainer.limit_predict_batches is not a setting", "trainer.extra"],
        ),
        ("+trainer.extra.nope=1", ["trainer.extra.nope=1", "not a lightning.Trainer argument"]),
        ("+trainer.extra.max_epochs=3", ["trainer.extra.max_epochs", "set trainer.max_epochs instead"]),
        ("optim.betas=[0.9]", ["optim.betas=[0.9]", "two numbers"]),
        ("+trainer.limit_train_batches=-1", ["trainer.limit_train_batches=-1"]),
        ("loss_options.ddp_gradient=mean", ["loss_options.ddp_gradient=mean", "['global', 'per_rank_mean']"]),
        ("optim.max_logit_scale=0", ["optim.max_logit_scale=0", "must be > 0"]),
    ],
)
def test_bad_training_value_is_named_before_any_work(tmp_path, no_model, override, fragments):
    refused(train, train_config(tmp_path, override), tmp_path, *fragments)


def test_a_model_for_other_images_than_the_scenes(tmp_path, no_model):
    """ViT-B-32 takes 224 px; the pretrained tiny model's scenes are 64 px."""
    cfg = train_config(tmp_path, "model.name=ViT-B-32", experiment="scenes_finetune")
    refused(train, cfg, tmp_path, "model.name=ViT-B-32 takes 224-px images", "model.image_size=64")


def test_a_gpu_trainer_on_a_machine_without_one(tmp_path, no_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(
        train, train_config(tmp_path, "trainer=gpu"), tmp_path, "trainer.accelerator=gpu", "no CUDA device"
    )


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["batch_size=0"], ["batch_size=0", "an integer >= 1"]),
        (["device=cuda:5"], ["device=cuda:5", "CUDA device(s)"]),
        (["device=fast"], ["device=fast", "not a device"]),
        (["rerank=egr", "rerank.depth=0"], ["rerank.depth=0", ">= 1"]),
        (["rerank=egr", "rerank.depth=5"], ["rerank.depth=5", ">= rerank.k=20"]),
        (["rerank=tbr", "rerank.k=-1"], ["rerank.k=-1", ">= 1"]),
        (["rerank=tbr", "rerank.stages=[tbr,bm25]"], ["rerank.stages=['tbr', 'bm25']", "stages are"]),
        (["rerank.k=ten"], ["rerank.k=ten", "could not be converted to Integer"]),
        (["+foo=1"], ["foo is not a setting"]),
        (["model.image_size=32"], ["model.image_size=32"]),
        (["features.precision=fp16"], ["features.precision=fp16", "choose one of ['fp32', 'bf16']"]),
        (["features.masked_text_source=segs"], ["features.masked_text_source=segs", "'text_segs'"]),
        (["features.caption_entities=by_row"], ["features.caption_entities=by_row", "'by_position'"]),
        (["features.gallery_order=npz"], ["features.gallery_order=npz", "'files'"]),
        (["rerank.accumulate=float16"], ["rerank.accumulate=float16", "['float32', 'float64']"]),
    ],
)
def test_bad_evaluation_value_is_named_before_any_work(tmp_path, no_model, monkeypatch, overrides, fragments):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # whatever this machine has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    refused(evaluate, evaluate_config(tmp_path, *overrides), tmp_path, *fragments)


def test_trainer_arguments_are_the_configs_and_the_extra_ones(tmp_path):
    settings = train_settings(train_config(tmp_path, "+trainer.extra.benchmark=true", "+debug=limit"))
    assert settings.trainer["benchmark"] is True
    assert settings.trainer["limit_train_batches"] == 3 and isinstance(
        settings.trainer["limit_train_batches"], int
    )
    assert "overfit_batches" not in settings.trainer  # a key the config leaves out keeps Lightning's default
    assert settings.trainer["precision"] == "32-true" and settings.trainer["enable_progress_bar"] is False
    assert settings.weights == {
        "clip": 1.0,
        "prompt": 0.0,
        "text_mask": 0.0,
        "vg_contrast": 0.0,
        "vg_mask": 0.0,
        "ground_mask": 0.0,
        "swap_negatives": 0.0,
    }
    assert settings.model.image_size == 64 and settings.layout.root == tmp_path / "scenes"
    assert not (tmp_path / "run").exists() and not (tmp_path / "scenes").exists()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_fits_the_schema(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    name, schema = (
        ("evaluate", EvaluateConfig) if "for agree.evaluate" in text.lower() else ("train", TrainConfig)
    )
    typed(schema, config(name, f"+experiment={experiment}", "output_dir=x", "data.root=x"))


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "debug").glob("*.yaml")))
def test_every_debug_option_fits_the_schema(option):
    typed(TrainConfig, config("train", f"+debug={option}", "output_dir=x"))


@pytest.mark.parametrize(
    "argv, key",
    [
        (["agree.train", "+experiment=demo", "trainer.max_epochs=abc"], "trainer.max_epochs=abc"),
        (["agree.train", "+experiment=demo", "+foo=1"], "foo is not a setting"),
        (["agree.evaluate", "rerank=tbr", "rerank.k=-1"], "rerank.k=-1"),
    ],
)
def test_the_command_line_prints_one_line(tmp_path, argv, key):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", *argv, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_LIMIT,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"config error: {key}"), done.stderr
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", ".lock", "train.log", "evaluate.log"}  # Hydra's
    assert not (tmp_path / "data").exists()  # no scenes generated
