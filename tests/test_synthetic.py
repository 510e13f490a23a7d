"""The embedded scenes dataset: deterministic, entity masks exact, hard negatives present."""

import hashlib
from dataclasses import replace

import numpy as np

from agree.data import synthetic
from agree.data.npz_images import NpzImages
from agree.data.pixels import CLIP_MEAN, CLIP_STD, normalise
from agree.data.records import read_test_texts

from .conftest import SMALL_SCENES


def digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_files_other_seed_other_files(tmp_path, scenes):
    again = synthetic.generate(tmp_path / "again", SMALL_SCENES)
    assert digest(again.root) == digest(scenes.root)
    other = synthetic.generate(tmp_path / "other", replace(SMALL_SCENES, seed=4))
    assert (
        digest(other.root)["annotation/flickr30k_train_pred.jsonl"]
        != digest(scenes.root)["annotation/flickr30k_train_pred.jsonl"]
    )


def test_grounded_mask_blanks_exactly_the_entity_box():
    rng = np.random.default_rng(0)
    obj = synthetic.SceneObject("square", "red", "large", 1, 0.5)
    pixels = synthetic.render([obj], 64, 3, rng, noise=0.0)
    box = synthetic.object_box(obj, 64, 3)
    x0, y0, x1, y1 = box
    full, masked = normalise(pixels), normalise(pixels, blank=box)
    changed = np.any(full != masked, axis=0)
    black = (0 - CLIP_MEAN) / CLIP_STD
    assert np.allclose(masked[:, y0:y1, x0:x1], black[:, None, None])
    assert changed[y0:y1, x0:x1].all() and changed.sum() == (y1 - y0) * (x1 - x0)


def test_binding_groups_make_hard_negatives(scenes):
    """Test images share their words with other test images: only the binding tells them apart."""
    texts = read_test_texts(scenes.test_texts)
    images_by_words = {}
    for t in texts:
        words = frozenset(
            w for w in t.text.replace(",", "").split() if w in synthetic.COLORS or w in synthetic.SHAPES
        )
        images_by_words.setdefault(words, set()).add(t.image_ids[0])
    assert max(len(v) for v in images_by_words.values()) >= 2


def test_cli_writes_dataset(tmp_path):
    synthetic.main(
        [
            f"root={tmp_path / 'cli'}",
            "seed=1",
            "train_images=6",
            "val_images=3",
            "test_images=3",
            "vg_images_per_word=1",
            "image_size=32",
        ]
    )
    images = NpzImages(tmp_path / "cli/annotation/flickr30k_test_images.npz", 32)
    assert len(images) == 3
