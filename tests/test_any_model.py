"""Any open_clip architecture: input size and normalisation come from open_clip, no downloads."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from agree.config import resolve_model
from agree.data.datasets import random_square
from agree.data.npz_images import NpzImages
from agree.data.pixels import OPENAI_MEAN, black
from agree.train import train

TINY_DATA = [
    "data.synthetic.train_images=6",
    "data.synthetic.val_images=4",
    "data.synthetic.test_images=4",
    "data.synthetic.vg_images_per_word=1",
    "data.batch_size=2",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
]


def config(*overrides):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose("train", ["+experiment=demo", "losses=agree", *overrides])


@pytest.mark.parametrize(
    ("name", "pretrained", "size", "mean"),
    [
        ("agree-tiny", None, 64, OPENAI_MEAN),
        ("ViT-B-32", None, 224, OPENAI_MEAN),
        ("RN50", None, 224, OPENAI_MEAN),
        ("ViT-B-16-SigLIP", "webli", 224, (0.5, 0.5, 0.5)),  # the tag's own normalisation
        ("ViT-SO400M-14-SigLIP-384", "webli", 384, (0.5, 0.5, 0.5)),
    ],
)
def test_size_and_normalisation_come_from_open_clip(name, pretrained, size, mean):
    cfg = config(f"model.name={name}", f"model.pretrained={pretrained or 'null'}", "output_dir=x")
    resolve_model(cfg)
    assert cfg.model.image_size == size and tuple(cfg.model.mean) == pytest.approx(mean)
    # the data config follows: the scenes are drawn at the model's size, in its normalisation
    assert cfg.data.image_size == size and cfg.data.synthetic.image_size == size
    assert tuple(cfg.data.synthetic.mean) == pytest.approx(mean)


def test_a_preset_value_still_wins():
    cfg = config("model.image_size=96", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]", "output_dir=x")
    resolve_model(cfg)
    assert (
        cfg.model.image_size == 96 and list(cfg.model.mean) == [0.5] * 3 and list(cfg.model.std) == [0.5] * 3
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.name=ViT-B-32"],
        # SigLIP's normalisation (its webli tag's, as resolved above): SigLIP's own tokenizer and
        # weights come from the hub, so a random-init ResNet stands in for the architecture here
        ["model.name=RN50", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]"],
    ],
    ids=["ViT-B-32", "RN50-SigLIP-normalisation"],
)
def test_trains_at_native_size_in_its_own_normalisation(tmp_path, overrides):
    """One AGREE step (all six losses, fallback squares included) and a validation, random init."""
    cfg = config(*overrides, "model.pretrained=null", f"output_dir={tmp_path / 'run'}",
                 f"data.root={tmp_path / 'scenes'}", *TINY_DATA)  # fmt: skip
    metrics, objects = train(cfg)
    assert "val/rsum" in metrics
    layout = objects["datamodule"].layout
    assert layout.image_size == 224 and layout.mean == tuple(cfg.model.mean)
    # the generated images are at the model's size, normalised with its mean and std
    images = NpzImages(layout.images_npz("train"), 224)
    background = images[images.keys()[0]][:, 0, 0]  # the scenes' grey background, (110, 110, 110)
    expected = (110 / 255 - np.asarray(cfg.model.mean)) / np.asarray(cfg.model.std)
    assert np.allclose(background, expected, atol=0.25)  # pixel noise is 4 % of the range
    # the fallback square is black in that normalisation
    train_set = objects["datamodule"].train_set
    fill = torch.tensor(black(cfg.model.mean, cfg.model.std))
    assert torch.allclose(torch.as_tensor(train_set.black_pixel), fill)
    image = train_set[0]["image"]
    generator = torch.Generator().manual_seed(0)
    masked = random_square(image, train_set.square, generator, "black", train_set.black_pixel)
    changed = (masked != image).any(0)
    assert changed.sum() > 0.9 * train_set.square**2
    assert torch.allclose(masked[:, changed], fill[:, None])
