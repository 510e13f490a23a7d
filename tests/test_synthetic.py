"""The embedded scenes dataset: deterministic, entity masks exact, hard negatives present."""

import hashlib
import json
import random
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


TINY = replace(SMALL_SCENES, train_images=12, val_images=6, test_images=9, vg_images_per_word=1)


def test_same_seed_same_files_other_seed_other_files(tmp_path, scenes):
    again = synthetic.generate(tmp_path / "again", SMALL_SCENES)
    assert digest(again.root) == digest(scenes.root)
    other = synthetic.generate(tmp_path / "other", replace(SMALL_SCENES, seed=4))
    assert (
        digest(other.root)["annotation/flickr30k_train_pred.jsonl"]
        != digest(scenes.root)["annotation/flickr30k_train_pred.jsonl"]
    )


def test_the_neglect_regime_is_deterministic_per_seed(tmp_path):
    cfg = replace(TINY, regime="neglect")
    first, again = synthetic.generate(tmp_path / "a", cfg), synthetic.generate(tmp_path / "b", cfg)
    assert digest(first.root) == digest(again.root)
    other = digest(synthetic.generate(tmp_path / "c", replace(cfg, seed=4)).root)
    binding = digest(synthetic.generate(tmp_path / "d", TINY).root)
    for name in ("annotation/flickr30k_train_pred.jsonl", "annotation/flickr30k_test_texts.jsonl"):
        assert digest(first.root)[name] != other[name] and digest(first.root)[name] != binding[name]


def test_the_test_split_does_not_depend_on_the_training_set_size(tmp_path):
    """A learning curve is measured on one test set, and a smaller training set is a prefix of a larger."""
    for regime in synthetic.REGIMES:
        small = synthetic.generate(tmp_path / f"{regime}6", replace(TINY, regime=regime, train_images=6))
        large = synthetic.generate(tmp_path / f"{regime}12", replace(TINY, regime=regime, train_images=12))
        a, b = digest(small.root), digest(large.root)
        for name in ("annotation/flickr30k_test_texts.jsonl", "annotation/flickr30k_test_images.npz"):
            assert a[name] == b[name], (regime, name)
        rows = [small.train_records.read_text().splitlines(), large.train_records.read_text().splitlines()]
        assert rows[1][: len(rows[0])] == rows[0] and len(rows[1]) > len(rows[0])


def test_neglect_groups_share_the_primary_object_and_differ_in_secondary_ones():
    rng = random.Random(0)
    for _ in range(50):
        group = synthetic._neglect_group(rng, replace(TINY, regime="neglect"))
        assert len(group) == TINY.binding_variants
        primaries = {scene[0] for scene in group}
        assert len(primaries) == 1 and next(iter(primaries)).size == "large"
        assert len({tuple((o.shape, o.color) for o in scene[1:]) for scene in group}) == len(group)
        for scene in group:
            assert 1 <= len(scene) - 1 <= TINY.max_objects - 1
            assert all(o.size == "small" for o in scene[1:])
            assert [(o.column, o.y) for o in scene[1:]] == [(o.column, o.y) for o in group[0][1:]]
            assert len({o.shape for o in scene}) == len({o.color for o in scene}) == len(scene)
            for text, segs in synthetic.neglect_captions(scene, 1, rng, 5):
                assert sorted(segs) == sorted(o.phrase(1) for o in scene)
                assert all(seg in text for seg in segs)


def test_the_neglect_bank_covers_every_shape_and_colour(tmp_path):
    layout = synthetic.generate(tmp_path / "n", replace(TINY, regime="neglect"))
    vocab = [json.loads(line)["vocab"] for line in layout.vg_vocab.read_text().splitlines()]
    assert sorted(vocab) == sorted(f"{c} {s}" for c in synthetic.COLORS for s in synthetic.SHAPES)
    objects = [json.loads(line) for line in layout.image_objects("train").read_text().splitlines()]
    assert all(set(row["image_objects"]) <= set(vocab) for row in objects)


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
