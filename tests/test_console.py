"""The console of the demo: one line per stage, the table, where the outputs are; none of the library
lines that are false, alarming without cause, or advertisements (see agree/console.py)."""

import logging
import os
import subprocess
import sys
import warnings

import torch

from agree import console
from agree.model.clip import CHECKPOINT_KEY, create_clip

FORBIDDEN = [  # the lines a newcomer saw in `make demo` before
    "No pretrained weights loaded for model",
    "Model initialized randomly",
    "`weights_only` was not set",
    "litlogger",
    "Tip: For seamless",
    "_pytree",
    "is deprecated",
    "Trainable params",  # Lightning's model summary
    "┏━━━",
    "GPU available",
]
SMALL = [
    "data.synthetic.train_images=16",
    "data.synthetic.val_images=8",
    "data.synthetic.test_images=12",
    "data.synthetic.vg_images_per_word=1",
]


def test_the_demo_console_is_its_stages_its_table_and_its_outputs(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    argv = [
        sys.executable,
        "-m",
        "agree.demo",
        f"output_dir={out}",
        f"data.root={tmp_path / 'scenes'}",
        *SMALL,
    ]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    printed = done.stdout + done.stderr
    assert done.returncode == 0 or "the demo did not show what it should" in done.stderr, printed
    lines = printed.splitlines()
    assert [line for line in lines if any(f in line for f in FORBIDDEN)] == [], printed
    assert [line[:4] for line in lines if line[:2] in ("1/", "2/", "3/")] == ["1/3 ", "2/3 ", "3/3 "]
    assert any(line.startswith("model ") and "RSUM" in line for line in lines)
    assert f"summary: {out / 'summary.json'}" in lines
    assert len(lines) <= 16, printed  # 3 stages, a 7-line table, outputs, the verdict


def test_open_clips_random_init_warning_is_dropped_only_for_weights_loaded_next(tmp_path, caplog):
    model = create_clip("agree-tiny")
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({CHECKPOINT_KEY: "agree-tiny", "state_dict": state}, tmp_path / "last.ckpt")
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        create_clip("agree-tiny", str(tmp_path / "last.ckpt"))
        assert console.RANDOM_INIT not in caplog.text
        create_clip("agree-tiny")  # really random: still said
        assert console.RANDOM_INIT in caplog.text


def test_library_noise_is_filtered_by_message_and_nothing_else(caplog):
    console.quiet_libraries()
    console.quiet_libraries()  # idempotent
    for name, message in console.LIGHTNING_NOISE.items():
        logger = logging.getLogger(name)
        assert sum(isinstance(f, console._DropMessage) for f in logger.filters) == 1
        with caplog.at_level(logging.INFO, logger=name):
            caplog.clear()
            logger.info(f"{message} and more")
            logger.info("Restoring states from the checkpoint")
        assert [r.getMessage() for r in caplog.records] == ["Restoring states from the checkpoint"]
    with warnings.catch_warnings(record=True) as seen:
        console.quiet_libraries()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another deprecation"]
