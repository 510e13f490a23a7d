"""The study's runner: which keys reach which runs, and records reused only when every parameter matches."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from agree.errors import ConfigError
from agree.study import RECORD_FORMAT, Run, StudyConfig, check_records, main, make_grid, split_overrides

SMALL = StudyConfig(seeds=[0, 1], lr_seeds=[0], sizes=[8, 16, 24], steps=2, val_images=6, test_images=6)
RUN = Run("neglect", 1, 16, "agree", 3e-4, "mean")


@pytest.fixture
def hydra():
    with initialize_config_module("agree.conf", version_base="1.3"):
        yield


def write_record(grid, run, params=None):
    path = grid.out / run.folder() / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"params": grid.params(run) if params is None else params, "val_rsum": 1.0}))
    return path


def test_training_keys_reach_the_trainings_only(hydra):
    """``trainer.*`` and ``optim.*`` go to trainings, ``rerank.*`` to evaluations, data to both."""
    overrides = [
        "trainer.gradient_clip_val=1.0",
        "optim.weight_decay=0.2",
        "data.synthetic.noise=0.1",
        "rerank.k=7",
    ]
    training, evaluation = compose("train", ["+experiment=scenes_finetune"]), compose("evaluate", [])
    shared, train_only, eval_only = split_overrides(overrides, training, evaluation)
    assert (shared, train_only, eval_only) == (
        ["data.synthetic.noise=0.1"],
        ["trainer.gradient_clip_val=1.0", "optim.weight_decay=0.2"],
        ["rerank.k=7"],
    )
    grid = make_grid(Path("/nonexistent"), replace(SMALL, overrides=overrides))
    params = grid.params(RUN)
    assert "trainer.gradient_clip_val=1.0" in params["train"] and "optim.weight_decay=0.2" in params["train"]
    assert not any(o.startswith(("trainer.", "optim.")) for o in params["evaluate"])
    assert "rerank.k=7" in params["evaluate"] and "rerank.k=7" not in params["train"]
    assert "data.synthetic.noise=0.1" in params["train"] and "data.synthetic.noise=0.1" in params["evaluate"]
    compose("train", params["train"])  # each list composes: no key reaches a config without it
    compose("evaluate", params["evaluate"])


def test_a_key_the_study_sets_is_refused_naming_the_study_key(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        main([f"output_dir={tmp_path / 'study'}", "data.synthetic.train_images=60"])
    message = str(stop.value)
    assert (
        message.startswith("config error: data.synthetic.train_images: set by the study")
        and "sizes" in message
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "change, named",
    [
        ({"sizes": [8, 12, 24]}, "data.synthetic.train_images"),  # zero-shot data: the middle size
        ({"steps": 4}, "trainer.max_epochs"),
        ({"test_images": 9}, "data.synthetic.test_images=9"),
        ({"overrides": ["data.synthetic.noise=0.1"]}, "data.synthetic.noise=0.1"),
        ({"overrides": ["model.pretrained=other.safetensors"]}, "model.pretrained=other.safetensors"),
        ({"overrides": ["trainer.gradient_clip_val=1.0"]}, "trainer.gradient_clip_val=1.0"),
    ],
)
def test_records_are_reused_only_when_every_parameter_matches(hydra, tmp_path, change, named):
    """Another middle size, step count, test size, model or override: one line, before any work."""
    grid = make_grid(tmp_path, SMALL)
    write_record(grid, RUN)
    zero = grid.out / "neglect" / "seed1" / "zero_shot" / "record.json"
    zero.parent.mkdir(parents=True)
    zero.write_text(json.dumps({"params": grid.zero_params("neglect", 1)}))
    check_records(grid)  # the same request reuses them
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as error:
        check_records(make_grid(tmp_path, replace(SMALL, **change)))
    message = str(error.value)
    assert "made with other parameters" in message and named in message and "\n" not in message, message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_record_of_another_format_is_never_reused(hydra, tmp_path):
    grid = make_grid(tmp_path, SMALL)
    old = dict(grid.params(RUN), format=RECORD_FORMAT - 1)
    write_record(grid, RUN, old)
    with pytest.raises(ConfigError, match="made with other parameters .*format"):
        check_records(grid)
    (grid.out / RUN.folder() / "record.json").write_text(json.dumps({"seed": 1, "test": {}}))  # no params
    with pytest.raises(ConfigError, match="not a record of this version of agree.study"):
        check_records(grid)
