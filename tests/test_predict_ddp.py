"""Evaluation with extraction by 2 processes (Lightning's predict loop under DDP: on 2 GPUs where the
machine has them, else on the CPU with gloo) writes one feature store equal to the single-process
one, and the same results."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from torch.distributed import TCPStore

from agree.data.feature_files import load_features
from agree.evaluate import evaluate
from agree.model.clip import create_clip, encode_image, encode_text
from agree.model.tokenizer import get_tokenizer
from agree.retrieval.metrics import DIRECTIONS
from agree.retrieval.predict import predict_features
from tests.conftest import SMALL_SCENES

REPO = Path(__file__).resolve().parents[1]
STORE = ("images", "texts", "entity_prompts", "entity_masks", "entity_valid")
# one process per GPU: on a machine with fewer than 2, the processes run on the CPU
DEVICE = "cuda" if torch.cuda.device_count() >= 2 else "cpu"
# float32 on the CPU; bf16 autocast on GPUs keeps 8 bits of mantissa (0.4 % per rounding), and each
# process's batches take other kernels than one process's
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6} if DEVICE == "cpu" else {"rtol": 0.0, "atol": 2e-2}

WORKER = """
import sys
from hydra import compose, initialize_config_module
from torch.distributed import TCPStore
from agree.evaluate import evaluate
with initialize_config_module("agree.conf", version_base="1.3"):
    evaluate(compose("evaluate", sys.argv[1:]))
"""


def rendezvous() -> TCPStore:
    """The store both processes join, served by the test on a port the system picks, as torchrun's
    agent serves it (``TORCHELASTIC_USE_AGENT_STORE``): the port is held from the moment it is chosen,
    where a free port looked up and closed could be taken by another program before a process binds it."""
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def overrides(scenes, out: Path, devices: int) -> list[str]:
    synthetic = [  # mean and std: the model's, as the fixture's
        f"data.synthetic.{k}={v}"
        for k, v in dataclasses.asdict(SMALL_SCENES).items()
        if k not in ("mean", "std")
    ]
    # batch 4: each process's share (10 of the 20 images, 50 of the 100 captions) ends in a short batch
    return [
        f"output_dir={out}",
        f"data.root={scenes.root}",
        *synthetic,
        "rerank=egr",
        "batch_size=4",
        f"devices={devices}",
        f"device={DEVICE}",
    ]


def test_two_processes_write_the_single_process_feature_store(scenes, tmp_path: Path) -> None:
    store = rendezvous()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, *overrides(scenes, tmp_path / "ddp", 2)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for p in processes:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output[-3000:]
    assert store.num_keys() > 0  # the processes met at the held port
    with initialize_config_module("agree.conf", version_base="1.3"):
        single = evaluate(compose("evaluate", overrides(scenes, tmp_path / "single", 1)))
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    if DEVICE == "cpu":
        assert results == single
    else:  # in bf16 a near-tie may go the other way: one item of 20 images is 5 points
        assert results.keys() == single.keys()
        for stage, block in single.items():
            for direction in DIRECTIONS:
                assert results[stage][direction] == pytest.approx(block[direction], abs=5), stage
    for name in STORE:
        ids, features = load_features(tmp_path / "ddp" / "features", name)
        want_ids, want = load_features(tmp_path / "single" / "features", name)
        assert ids == want_ids and features.shape == want.shape
        np.testing.assert_allclose(features, want, **TOLERANCE, err_msg=name)


def test_every_pass_runs_in_one_predict_run(monkeypatch) -> None:
    """Image and text passes share one run of the predict loop, so the model is put on each
    process's device once (a run puts it there at its start and back on the CPU at its end)."""
    runs = []
    predict = L.Trainer.predict
    monkeypatch.setattr(L.Trainer, "predict", lambda self, *a, **k: runs.append(1) or predict(self, *a, **k))
    torch.manual_seed(0)
    model = create_clip("agree-tiny").eval()
    images = torch.randn(5, 3, 64, 64)
    tokens = get_tokenizer("agree-tiny")(["a red circle", "a blue square left of a red circle", "a cross"])
    trainer = {"accelerator": "cpu", "devices": 1}
    got = predict_features(model, [(encode_image, images, 0), (encode_text, tokens, 0)], 2, trainer)
    assert len(runs) == 1
    with torch.no_grad():
        want = [encode_image(model, images), encode_text(model, tokens)]
    for features, expected in zip(got, want, strict=True):
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
