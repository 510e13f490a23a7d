"""The pretraining corpus and command: unbound captions, deterministic weights, the shipped file."""

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from agree.data import alt_text
from agree.data.synthetic import COLORS, SHAPES
from agree.model.clip import WEIGHTS_DIR, create_clip
from agree.pretrain import PretrainConfig, pretrain, save_weights, sha256

SMALL = PretrainConfig(steps=3, batch_size=8, warmup_steps=1)
README = Path(__file__).resolve().parents[1] / "README.md"


def test_captions_name_objects_without_binding_or_relations():
    rng, cfg = random.Random(0), alt_text.AltTextConfig()
    singles = 0
    for _ in range(300):
        objects = alt_text.sample(rng, cfg)
        caption = alt_text.alt_text(objects, rng)
        if len(objects) == 1:
            singles += 1
            assert caption == objects[0].phrase(1)
            continue
        words = caption.split(", ")
        assert sorted(words) == sorted([o.shape for o in objects] + [o.color for o in objects])
        assert set(words) <= set(SHAPES) | set(COLORS)
        assert not re.search(r"\b(left|right|between|of|and)\b", caption)
    assert 0.25 < singles / 300 < 0.55


def test_corpus_batches_are_a_deterministic_stream():
    cfg = alt_text.AltTextConfig(seed=1)
    a, b = alt_text.batch(cfg, 5, 4), alt_text.batch(cfg, 5, 4)
    assert (a[0] == b[0]).all() and a[1] == b[1]
    assert not (a[0] == alt_text.batch(cfg, 6, 4)[0]).all()


def test_pretraining_is_deterministic_per_seed(tmp_path):
    first, again = pretrain(SMALL), pretrain(SMALL)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert save_weights(first, tmp_path / "a.safetensors") == save_weights(again, tmp_path / "b.safetensors")
    other = pretrain(replace(SMALL, corpus=replace(SMALL.corpus, seed=1)))
    assert not torch.equal(other.visual.conv1.weight, first.visual.conv1.weight)
    untrained = create_clip(SMALL.model_name, None)
    assert not torch.equal(untrained.text_projection, first.text_projection)


def test_shipped_weights_match_their_recorded_sha256():
    recorded = dict(
        reversed(line.split()) for line in (WEIGHTS_DIR / "SHA256SUMS").read_text().splitlines() if line
    )
    weights = WEIGHTS_DIR / "scenes_pretrained.safetensors"
    assert set(recorded) == {weights.name}
    assert sha256(weights) == recorded[weights.name]
    assert recorded[weights.name] in README.read_text(), "the README states the SHA-256 too"


def test_model_config_loads_the_shipped_weights_in_fp32():
    with initialize_config_module("agree.conf", version_base="1.3"):
        cfg = compose("evaluate", ["model=scenes_pretrained"])
    assert Path(cfg.model.pretrained) == WEIGHTS_DIR / "scenes_pretrained.safetensors"
    model = create_clip(cfg.model.name, cfg.model.pretrained)
    from safetensors.torch import load_file

    stored = load_file(cfg.model.pretrained)
    assert model.text_projection.dtype == torch.float32
    assert torch.equal(model.text_projection, stored["text_projection"].float())
    assert model.logit_scale.exp().item() == pytest.approx(stored["logit_scale"].float().exp().item())
