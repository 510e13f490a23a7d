"""Feature extraction by 2 CPU processes (gloo) through Lightning's predict loop equals one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from agree.model.clip import create_clip, encode_image, encode_text, get_tokenizer
from agree.retrieval.features import extract

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, N_TEXTS = 13, 11  # not multiples of 2 or of the batch: uneven shares and short batches

WORKER = """
import sys, torch
from agree.model.clip import create_clip, encode_image, encode_text
from agree.retrieval.predict import predict_features
images, tokens = torch.load(sys.argv[1])
torch.manual_seed(0)
model = create_clip("agree-tiny").eval()
trainer = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "32-true"}
with torch.no_grad():
    out = (
        predict_features(model, encode_image, images, 4, trainer),
        predict_features(model, encode_text, tokens, 4, trainer),
    )
if torch.distributed.get_rank() == 0:
    torch.save(out, sys.argv[2])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N_IMAGES, 3, 64, 64, generator=g)
    tokens = get_tokenizer("agree-tiny")([f"a red circle {i} left of a square" for i in range(N_TEXTS)])
    return images, tokens


def test_two_processes_give_the_single_process_features(tmp_path: Path) -> None:
    images, tokens = inputs()
    torch.save((images, tokens), tmp_path / "inputs.pt")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for p in processes:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    image_features, text_features = torch.load(tmp_path / "out.pt")
    torch.manual_seed(0)
    model = create_clip("agree-tiny").eval()
    device = torch.device("cpu")
    expected_images = extract(lambda x: encode_image(model, x), images.split(5), device, "images")
    expected_texts = extract(lambda x: encode_text(model, x), tokens.split(5), device, "texts")
    assert image_features.shape == expected_images.shape and text_features.shape == expected_texts.shape
    torch.testing.assert_close(image_features, expected_images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_features, expected_texts, rtol=1e-5, atol=1e-6)
