"""Progress bars (quiet under CI or redirected output) and what each logger records."""

import json
import struct
import sys
import time
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_module
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from agree.callbacks import configured_callbacks, example_columns
from agree.progress import interactive, progress
from agree.train import train

from .conftest import SMALL_SCENES

# the small release of the `scenes` fixture: the same parameters, so nothing is generated again
SCENES = [
    f"data.synthetic.seed={SMALL_SCENES.seed}",
    f"data.synthetic.train_images={SMALL_SCENES.train_images}",
    f"data.synthetic.val_images={SMALL_SCENES.val_images}",
    f"data.synthetic.test_images={SMALL_SCENES.test_images}",
    f"data.synthetic.vg_images_per_word={SMALL_SCENES.vg_images_per_word}",
]


def tiny_training(scenes, out, logger: str):
    """Two training steps and one validation batch with ``logger``; returns the Trainer."""
    with initialize_config_module("agree.conf", version_base="1.3"):
        cfg = compose(
            "train",
            [
                "+experiment=demo",
                f"logger={logger}",
                f"output_dir={out}",
                f"data.root={scenes.root}",
                *SCENES,
                "trainer.max_epochs=1",
                "trainer.log_every_n_steps=1",
                "+trainer.limit_train_batches=2",
                "+trainer.limit_val_batches=1",
            ],
        )
    try:
        return train(cfg)[1]["trainer"]
    finally:
        if logger == "wandb":
            import wandb

            wandb.finish()


# ---------------------------------------------------------------------------------------------
# progress bars


class Terminal:
    """A stand-in for sys.stdout / sys.stderr that says it is a terminal."""

    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(
    ("ci", "tty", "expected"),
    [
        (None, True, True),
        ("false", True, True),
        ("true", True, False),
        ("1", True, False),
        (None, False, False),
    ],
)
def test_progress_only_on_a_terminal_outside_ci(monkeypatch, ci, tty, expected):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    out = Terminal() if tty else sys.stdout
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", Terminal() if tty else sys.stderr)
    assert interactive() is expected
    assert list(progress(range(3), "counting", 3)) == [0, 1, 2]
    if tty:
        assert ("counting" in sys.stderr.text) is expected  # the bar was drawn, or nothing at all


def test_quiet_when_redirected(capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert list(progress(iter("abc"), "letters")) == ["a", "b", "c"]
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("ci", ["false", "true"])
def test_lightning_bar_follows_the_terminal(scenes, tmp_path, monkeypatch, ci):
    """`enable_progress_bar: null` (the default): Lightning's bar on a terminal, off under CI."""
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", Terminal())
    trainer = tiny_training(scenes, tmp_path / "run", "csv")
    assert (trainer.progress_bar_callback is not None) is (ci == "false")
    assert ("Epoch 0" in sys.stdout.text) is (ci == "false")


# ---------------------------------------------------------------------------------------------
# loggers


def test_logging_callbacks_per_logger(tmp_path):
    """The default group: no logger: the best checkpoint; any logger: also the learning rate; W&B: also
    the examples table. A progress-bar callback only with the bar on."""
    with initialize_config_module("agree.conf", version_base="1.3"):
        group = compose("train", [f"output_dir={tmp_path}", "callbacks=[default,rich_progress]"]).callbacks
    kinds = lambda logger, bar=False: [type(c).__name__ for c in configured_callbacks(group, logger, bar)]  # noqa: E731
    assert kinds(False) == ["ModelCheckpoint"]
    assert kinds(CSVLogger(tmp_path)) == ["ModelCheckpoint", "LearningRateMonitor"]
    assert kinds(CSVLogger(tmp_path), bar=True) == [
        "ModelCheckpoint",
        "LearningRateMonitor",
        "RichProgressBar",
    ]
    wandb = WandbLogger(save_dir=tmp_path, offline=True)
    assert kinds(wandb) == ["ModelCheckpoint", "LearningRateMonitor", "RetrievalExamples"]


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_csv_and_tensorboard_log_the_learning_rate(scenes, tmp_path, logger):
    tiny_training(scenes, tmp_path / "run", logger)
    if logger == "csv":
        header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"lr-AdamW/pg1", "train/loss_clip", "train/logit_scale", "val/rsum"} <= set(header)
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
        assert {"lr-AdamW/pg1", "train/loss_clip", "val/rsum"} <= set(events.Tags()["scalars"])


def wandb_records(path):
    """The protobuf records of an offline ``run-*.wandb`` file (LevelDB log format, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, pos, parts = path.read_bytes(), 32768, 7, []  # 7: the W&B file header
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        parts.append(raw[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def finished_wandb_records(path, timeout: float = 60.0) -> list:
    """The records of a run file once its ``exit`` record is on disk (wandb's service writes it after
    ``wandb.finish()`` returns, late when the machine is busy)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_run_logs_everything_and_the_examples_table(scenes, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging
    tiny_training(scenes, tmp_path / "run", "wandb")
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")

    # the table of the validation: 4 queries, 5 retrieved images each, ground truth flagged
    (table_file,) = (run / "files" / "media" / "table" / "val").glob("examples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == example_columns(5)
    assert len(table["data"]) == 4
    for query, rank, *rest in table["data"]:
        images, flags = rest[:5], rest[5:]
        assert query and isinstance(rank, int) and rank >= 1 and all(isinstance(f, bool) for f in flags)
        assert flags == [r == rank for r in range(1, 6)]  # the one ground-truth image, where it ranked
        assert images == ["Image"] * 5  # the run's copy; the images travel in the table artifact

    # config, losses, learning rate, logit scale, recalls and the table are in the run's history
    records = finished_wandb_records(next(run.glob("run-*.wandb")))
    config = {u.key for r in records if r.HasField("config") for u in r.config.update}
    history = {
        item.key or "/".join(item.nested_key): item.value_json
        for r in records
        if r.HasField("history")
        for item in r.history.item
    }
    assert {"losses", "optim", "model", "data", "trainer"} <= config
    expected = {
        "train/loss",
        "train/loss_clip",
        "train/logit_scale",
        "lr-AdamW/pg1",
        "val/rsum",
        "val/t2i_r1",
    }
    assert expected <= set(history)
    assert json.loads(history["val/examples/_type"]) == "table-file"

    # the artifact holds the table with its thumbnails, "ground truth" on the flagged ones
    (artifact,) = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "run_table"]
    files = {c.path: c.local_path for c in artifact.manifest.contents}
    full = json.loads(open(files[next(p for p in files if p.endswith(".table.json"))]).read())
    for row, run_row in zip(full["data"], table["data"], strict=True):
        shown, flags = row[2:7], run_row[7:]
        assert [im["caption"] == "ground truth" for im in shown] == flags
        for im in shown:
            with Image.open(files[im["path"]]) as thumb:
                assert thumb.size == (64, 64) and len(set(thumb.getdata())) > 10


def test_search_reranking_and_generation_show_progress(tmp_path, monkeypatch):
    """On a terminal, the long loops outside Lightning draw a bar each; under CI they draw nothing."""
    from agree.data.synthetic import generate
    from agree.retrieval.rerank import egr_image_to_text, egr_text_to_image, tbr
    from agree.retrieval.search import topk_both

    def run() -> str:
        monkeypatch.setattr(sys, "stdout", Terminal())
        monkeypatch.setattr(sys, "stderr", Terminal())
        g = torch.Generator().manual_seed(0)
        texts, images = torch.randn(30, 8, generator=g), torch.randn(6, 8, generator=g)
        prompts, masks = torch.randn(30, 3, 8, generator=g), torch.randn(30, 3, 8, generator=g)
        valid = torch.ones(30, 3, dtype=torch.bool)
        (_, t2i), (_, i2t) = topk_both(texts, images, 5)
        tbr(t2i, i2t)
        egr_text_to_image(texts, images, prompts, masks, valid, 5)
        egr_image_to_text(images, texts, prompts, masks, valid, 5)
        generate(tmp_path / f"scenes-{len(list(tmp_path.iterdir()))}", replace(SMALL_SCENES, train_images=4,
                 val_images=2, test_images=2, vg_images_per_word=1))  # fmt: skip
        return sys.stderr.text

    monkeypatch.delenv("CI", raising=False)
    shown = run()
    for desc in ("search", "TBR", "EGR text->image", "EGR image->text", "scenes: train", "scenes: test"):
        assert desc in shown, desc
    monkeypatch.setenv("CI", "true")
    assert run() == ""
