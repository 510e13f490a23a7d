"""Entry points as users launch them: experiments compose, DDP launch, W&B offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import agree
from agree.settings import config_loss_weights as loss_weights
from agree.train import train

from .conftest import SUBPROCESS_LIMIT

EXPERIMENTS = sorted(p.stem for p in (Path(agree.__file__).parent / "conf" / "experiment").glob("*.yaml"))
SMALL = [
    "data.synthetic.train_images=20",
    "data.synthetic.val_images=8",
    "data.synthetic.test_images=8",
    "data.synthetic.vg_images_per_word=1",
    "trainer.enable_progress_bar=false",
]


def config(name, *overrides):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(name, list(overrides))


# presets of agree.evaluate; the others are agree.train's
EVALUATE_EXPERIMENTS = {"flickr30k_zeroshot", "flickr30k_finetuned", "scenes_zeroshot", "scenes_finetuned"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    if experiment in EVALUATE_EXPERIMENTS:
        cfg = config("evaluate", f"+experiment={experiment}", "output_dir=x")
        assert cfg.model.name and cfg.rerank.stages
        return
    cfg = config("train", f"+experiment={experiment}", "output_dir=x")
    assert cfg.model.name and loss_weights(cfg)["clip"] > 0


def test_ablation_drops_each_loss_once():
    cfg = config("train", "+experiment=ablation", "output_dir=x", "drop_loss=vg_mask")
    weights = loss_weights(cfg)
    assert weights["vg_mask"] == 0 and weights["prompt"] == 0.03 and weights["clip"] == 0.9
    with pytest.raises(ValueError, match="drop_loss='nope' is not a loss"):
        loss_weights(config("train", "output_dir=x", "drop_loss=nope"))


def test_ddp_launch_two_cpu_processes(tmp_path):
    """`trainer=ddp` through the real command line: two processes, one run directory."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "agree.train",
        "+experiment=demo",
        "losses=agree",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        f"data.root={tmp_path / 'scenes'}",
        f"hydra.run.dir={run_dir}",
        *SMALL,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_LIMIT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/rsum"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"train/loss_{name}" in header for name in ("clip", "prompt", "vg_mask", "ground_mask"))
    assert not (tmp_path / "outputs").exists()  # the second process wrote into the same run dir


def test_wandb_logger_offline_without_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = config(
        "train",
        "+experiment=demo",
        "losses=agree",
        "logger=wandb",
        f"output_dir={tmp_path / 'run'}",
        f"data.root={tmp_path / 'scenes'}",
        "trainer.max_steps=2",
        "+trainer.limit_val_batches=1",
        *SMALL,
    )
    try:
        train(cfg)
    finally:
        import wandb

        wandb.finish()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))


def test_evaluation_presets_state_the_papers_settings(tmp_path):
    zero_shot = config("evaluate", "+experiment=scenes_zeroshot", "output_dir=x")
    assert zero_shot.model.pretrained.endswith("scenes_pretrained.safetensors")
    assert list(zero_shot.rerank.stages) == ["egr", "tbr"] and zero_shot.rerank.k == 20
    tuned = config("evaluate", "+experiment=scenes_finetuned", "output_dir=x", "ckpt_path=run/last.ckpt")
    assert list(tuned.rerank.stages) == ["tbr"] and tuned.rerank.k == 10
    release = config("evaluate", "+experiment=flickr30k_finetuned", "output_dir=x", "ckpt_path=c.ckpt")
    assert release.model.name == "ViT-L-14-quickgelu" and release.rerank.k == 10


def test_a_fine_tuned_preset_without_its_checkpoint_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "agree.evaluate",
        "+experiment=scenes_finetuned",
        f"hydra.run.dir={tmp_path}",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_LIMIT
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("config error: ckpt_path is not set") and "last.ckpt" in line
    assert not (tmp_path / "results.json").exists()


def test_imports_are_frozen_once_per_process():
    """The objects alive after the imports leave the collector's walks; a multirun's next job
    freezes nothing more, so an earlier job's garbage is still collected."""
    code = (
        "import gc, torch\n"
        "from agree.cli import freeze_imports\n"
        "freeze_imports(); first = gc.get_freeze_count()\n"
        "garbage = [[] for _ in range(1000)]\n"
        "freeze_imports()\n"
        "print(first > 100_000, gc.get_freeze_count() == first)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
