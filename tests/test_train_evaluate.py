"""End to end: compose the real configs, train the tiny model on CPU, evaluate from its checkpoint."""

import json

import pytest
from hydra import compose, initialize_config_module

from agree.atomic import write_npz
from agree.data.records import read_test_texts
from agree.errors import DataFormatError
from agree.evaluate import evaluate
from agree.folders import MARKER
from agree.runlock import LOCK
from agree.train import train

SCENES = [
    "data.synthetic.train_images=300",
    "data.synthetic.val_images=20",
    "data.synthetic.test_images=40",
    "data.synthetic.vg_images_per_word=2",
]


def config(name, *overrides):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(name, list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "scenes"
    out = tmp_path_factory.mktemp("train")
    cfg = config(
        "train",
        "+experiment=demo",
        f"output_dir={out}",
        f"data.root={root}",
        *SCENES,
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "optim.warmup_steps=10",
    )
    metrics, objects = train(cfg)
    return root, out, metrics


def test_training_writes_checkpoint_metrics_and_logs(trained):
    _, out, metrics = trained
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert {
        "val/t2i_r1",
        "val/t2i_r5",
        "val/t2i_r10",
        "val/i2t_r1",
        "val/i2t_r5",
        "val/i2t_r10",
        "val/rsum",
    } <= set(metrics)
    logged = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss_clip" in logged and "val/rsum" in logged


def test_learning_is_real(trained, tmp_path):
    """Test R@5 in both directions is at least 3x chance after a short CPU training."""
    root, out, _ = trained
    cfg = config(
        "evaluate",
        f"output_dir={tmp_path}",
        f"data.root={root}",
        *SCENES,
        f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
    )
    results = evaluate(cfg)
    images = 40
    chance_t2i = 5 / images
    chance_i2t = 1 - (1 - 5 / (5 * images)) ** 5  # any of 5 captions among 5*images in the top 5
    assert results["raw"]["text_to_image"]["r5"] / 100 >= 3 * chance_t2i, results
    assert results["raw"]["image_to_text"]["r5"] / 100 >= 3 * chance_i2t, results
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert set(written["raw"]) == {"text_to_image", "image_to_text", "rsum"}
    predictions = (tmp_path / "predictions" / "raw_text_to_image.jsonl").read_text().splitlines()
    first = json.loads(predictions[0])
    assert len(predictions) == 200 and len(first["item_ids"]) == 10 and isinstance(first["query_id"], int)
    evaluation = json.loads((tmp_path / "evaluation" / "raw_image_to_text.json").read_text())
    assert evaluation["success"] and evaluation["scoreJson"]["r1"] == pytest.approx(
        results["raw"]["image_to_text"]["r1"]
    )
    queries = read_test_texts(root / "annotation" / "flickr30k_test_texts.jsonl")
    assert json.loads((tmp_path / "features" / "texts.ids.json").read_text()) == [q.query_id for q in queries]


def test_bad_test_images_leave_no_results(trained, tmp_path):
    """A NaN image fails with the file and key named, before any output is written."""
    root, _, _ = trained
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    npz = broken / "annotation" / "flickr30k_test_images.npz"
    import numpy as np

    arrays = dict(np.load(npz))
    first = next(iter(arrays))
    arrays[first] = np.full_like(arrays[first], np.nan)
    write_npz(npz, arrays)
    out = tmp_path / "out"
    cfg = config("evaluate", f"output_dir={out}", f"data.root={broken}", *SCENES)
    with pytest.raises(DataFormatError, match=f"key '{first}': contains NaN"):
        evaluate(cfg)
    outputs = [p for p in out.rglob("*") if p.is_file() and p.name not in (MARKER, LOCK)]  # its claim
    assert not outputs
