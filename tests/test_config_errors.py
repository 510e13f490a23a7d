"""Config errors fail before any work: one line naming the key and what to do, no run outputs."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException

from agree.errors import ConfigError
from agree.evaluate import evaluate
from agree.train import train

from .conftest import SUBPROCESS_LIMIT


def config(name, *overrides):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(name, list(overrides))


@pytest.fixture(scope="module")
def release(scenes, tmp_path_factory):
    """The generated release read as real data (``data=flickr30k``), without its VG folder."""
    root = tmp_path_factory.mktemp("release") / "flickr"
    shutil.copytree(scenes.root, root, ignore=shutil.ignore_patterns("VG"))
    (root.parent / "VG").mkdir()  # data.vg_root's default, ${data.root}/../VG: empty
    return root


def fails(run, cfg, *fragments):
    """``run(cfg)`` raises ConfigError, a single line holding ``fragments``, and writes nothing."""
    with pytest.raises(ConfigError) as excinfo:
        run(cfg)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(cfg.output_dir)
    return message


def train_config(tmp_path, *overrides):
    return config("train", "+experiment=demo", f"output_dir={tmp_path / 'run'}", *overrides)


def real_data(release, *overrides):
    return ["data=flickr30k", f"data.root={release}", *overrides]


# ---------------------------------------------------------------------------------------------
# training


def test_data_root_not_set(tmp_path):
    fails(train, train_config(tmp_path, "data=flickr30k"), "data.root is not set", "data.root=<")


def test_data_root_missing_directory(tmp_path):
    cfg = train_config(tmp_path, "data=flickr30k", f"data.root={tmp_path / 'nowhere'}")
    fails(train, cfg, f"data.root={tmp_path / 'nowhere'}", "no such directory")


def test_data_root_without_annotations(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = train_config(tmp_path, "data=flickr30k", f"data.root={tmp_path / 'empty'}")
    fails(train, cfg, "flickr30k_train_pred.jsonl not found", "point data.root at a complete release")


def test_vg_mask_weight_without_vg_images(tmp_path, release):
    cfg = train_config(tmp_path, *real_data(release, "losses.vg_mask=0.15"))
    fails(
        train,
        cfg,
        "losses.vg_mask=0.15",
        "VG_images.64.npz not found",
        "set losses.vg_mask=0",
        "data.vg_root",
    )


def test_ground_mask_weight_without_grounding(tmp_path, release):
    (release.parent / "no_grounding").mkdir()
    root = release.parent / "no_grounding" / "flickr"
    shutil.copytree(release, root, ignore=shutil.ignore_patterns("*visual_grounding*"))
    cfg = train_config(tmp_path, *real_data(root, "losses.ground_mask=0.1"))
    fails(
        train, cfg, "losses.ground_mask=0.1", "visual_grounding.64.npz not found", "set losses.ground_mask=0"
    )


def test_real_data_with_the_clip_loss_passes_the_checks(tmp_path, release):
    from agree.settings import train_settings

    train_settings(train_config(tmp_path, *real_data(release)))  # VG files are not needed


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("losses.clip=-1", ["losses.clip=-1", "a loss weight is a number >= 0"]),
        ("+losses.colour=1", ["losses.colour is not a loss"]),
        ("drop_loss=nope", ["drop_loss='nope' is not a loss"]),
        ("losses.clip=0", ["every losses.* weight is 0", "set losses.clip=1"]),
        ("checkpoint.every_n_train_steps=0", ["checkpoint.every_n_train_steps=0", "integer >= 1"]),
        ("data.batch_size=0", ["data.batch_size=0"]),
        ("model.name=ViT-Nope", ["model.name=ViT-Nope", "choose model=tiny"]),
        ("model.pretrained=weights/missing.pt", ["model.pretrained=weights/missing.pt", "file not found"]),
        ("model.pretrained=laion9b", ["model.pretrained=laion9b", "the tags are"]),
        ("ckpt_path=nowhere/last.ckpt", ["ckpt_path=nowhere/last.ckpt", "not found", "drop ckpt_path"]),
        ("ckpt_path=last", ["ckpt_path=last", "checkpoints/last.ckpt not found", "hydra.run.dir"]),
    ],
)
def test_bad_setting_is_named(tmp_path, override, fragments):
    fails(train, train_config(tmp_path, override), *fragments)


@pytest.mark.parametrize("group, option", [("data", "imagenet"), ("losses", "triplet"), ("model", "vit_h14")])
def test_unknown_group_option_names_the_group(group, option):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as excinfo:
        config("train", f"{group}={option}")
    message = str(excinfo.value)
    assert f"'{group}/{option}'" in message and f"Available options in '{group}'" in message


def test_command_line_prints_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "agree.train",
        "+experiment=demo",
        "losses.clip=-1",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_LIMIT
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("config error: losses.clip=-1")
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "train.log"]  # no record (.hydra/)
    assert not (tmp_path / "data").exists()  # nothing generated either


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate_config(tmp_path, *overrides):
    return config("evaluate", f"output_dir={tmp_path / 'run'}", *overrides)


def test_evaluate_egr_without_entity_features(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"image_id": "1", "feature": [1.0]}\n')
    features = [f"features.image_jsonl={tmp_path / 'f.jsonl'}", f"features.text_jsonl={tmp_path / 'f.jsonl'}"]
    fails(evaluate, evaluate_config(tmp_path, "rerank=egr", *features), "rerank=egr needs entity features")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("ckpt_path=missing.ckpt", ["ckpt_path=missing.ckpt", "not found"]),
        ("annotations.texts=texts.jsonl", ["annotations.texts=texts.jsonl", "not found"]),
        ("model.pretrained=missing/weights.bin", ["model.pretrained=missing/weights.bin", "file not found"]),
        ("data=flickr30k", ["data.root is not set"]),
    ],
)
def test_evaluate_bad_setting_is_named(tmp_path, override, fragments):
    fails(evaluate, evaluate_config(tmp_path, override), *fragments)


def test_evaluate_more_processes_than_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = evaluate_config(tmp_path, "device=cuda", "devices=2")
    fails(evaluate, cfg, "devices=2", "this machine has 1", "devices=1 or fewer", "device=cpu")


def test_evaluate_egr_needs_the_entity_file_of_real_data(tmp_path, release):
    (release.parent / "no_segs").mkdir(exist_ok=True)
    root = release.parent / "no_segs" / "flickr"
    shutil.copytree(release, root, ignore=shutil.ignore_patterns("*segs*"))
    cfg = evaluate_config(tmp_path, "data=flickr30k", f"data.root={root}", "rerank=egr")
    fails(evaluate, cfg, "flickr30k_test_texts_segs.jsonl not found", "set annotations.text_segs")
