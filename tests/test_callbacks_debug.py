"""The `callbacks` and `debug` config groups, as lightning-hydra-template users expect them."""

import pytest
import torch
from hydra import compose, initialize_config_module

from agree.train import train

from .test_progress_and_wandb import SCENES


def run(scenes, out, *overrides):
    with initialize_config_module("agree.conf", version_base="1.3"):
        cfg = compose(
            "train",
            ["+experiment=demo", f"output_dir={out}", f"data.root={scenes.root}", *SCENES,
             "trainer.enable_progress_bar=false", *overrides],
        )  # fmt: skip
    return train(cfg)


def test_best_and_last_checkpoints_are_kept(scenes, tmp_path):
    _, objects = run(scenes, tmp_path, "trainer.max_epochs=3", "+trainer.limit_train_batches=2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    (best,) = [c for c in objects["trainer"].callbacks if type(c).__name__ == "ModelCheckpoint"]
    rsums = [float(r["val/rsum"]) for r in csv_rows(tmp_path / "csv" / "metrics.csv") if r["val/rsum"]]
    assert len(rsums) == 3 and float(best.best_model_score) == pytest.approx(max(rsums))
    stored = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert stored["epoch"] == rsums.index(max(rsums))


def csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_early_stopping_is_a_group_option(scenes, tmp_path):
    _, objects = run(
        scenes, tmp_path, "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.stopping_threshold=0",
        "trainer.max_epochs=5", "+trainer.limit_train_batches=1",
    )  # fmt: skip
    assert objects["trainer"].current_epoch == 1  # stopped after the first validation, not 5 epochs


def test_no_callbacks_still_writes_the_resumable_last_checkpoint(scenes, tmp_path):
    run(scenes, tmp_path, "callbacks=none", "trainer.max_epochs=1", "+trainer.limit_train_batches=1")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("debug", ["default", "fdr", "overfit", "limit", "profiler"])
def test_debug_options(scenes, tmp_path, debug):
    extra = ["trainer.max_epochs=2"] if debug == "overfit" else []
    if debug in ("default", "profiler"):
        extra = ["+trainer.limit_train_batches=1"]
    _, objects = run(scenes, tmp_path, f"+debug={debug}", *extra)
    trainer = objects["trainer"]
    assert trainer.num_devices == 1 and type(trainer.accelerator).__name__ == "CPUAccelerator"
    expected = {
        "default": lambda: trainer.current_epoch == 1,
        "fdr": lambda: trainer.fast_dev_run and trainer.global_step == 1,
        "overfit": lambda: trainer.overfit_batches == 3 and trainer.global_step == 2 * 3,
        "limit": lambda: trainer.limit_train_batches == 3 and trainer.global_step == 3 * 3,
        "profiler": lambda: type(trainer.profiler).__name__ == "SimpleProfiler",
    }
    assert expected[debug]()
    assert torch.is_anomaly_enabled() is False  # Lightning's detect_anomaly is scoped to the run
