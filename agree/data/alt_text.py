"""The pretraining corpus: scenes with web-alt-text-like captions, one kind per regime of the scenes.

The shapes, colours and renderer are those of the scenes dataset (``agree.data.synthetic``).

- ``binding``: a caption never says which colour goes with which shape, nor where anything is: a
  single-object image gets its phrase ("a red circle"), a several-object image a tag list of its
  shapes and colours in random order ("blue, circle, square, red"). A model pretrained on it
  learns objects and colours, and binds them only as far as single-object images teach it, much
  as CLIP is known to do.
- ``neglect``: an image holds one large object and up to two small ones, and its caption names
  the large one only ("a red circle"), as web alt-text names an image's most salient object. A
  model pretrained on it knows every shape and colour as a primary object and neglects the
  secondary ones.

Batches are drawn from ``(seed, batch index)``, so the corpus is a deterministic stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from agree.data.pixels import normalise
from agree.data.synthetic import COLORS, SHAPES, SceneObject, render, salient_scene


@dataclass(frozen=True)
class AltTextConfig:
    """Parameters of the corpus."""

    seed: int = 0
    regime: str = "binding"  # binding: unbound tag lists; neglect: the salient object only
    image_size: int = 64
    max_objects: int = 3  # columns of the canvas, as in the scenes
    single_object: float = 0.4  # share of single-object images (neglect: without small objects)
    noise: float = 0.04


def alt_text(objects: list[SceneObject], rng: random.Random, regime: str = "binding") -> str:
    """The caption of a corpus image: its phrase if alone (neglect: the first, salient object's
    phrase), else its words as an unbound tag list."""
    if len(objects) == 1 or regime == "neglect":
        return objects[0].phrase(1)
    words = [o.shape for o in objects] + [o.color for o in objects]
    rng.shuffle(words)
    return ", ".join(words)


def sample(rng: random.Random, cfg: AltTextConfig) -> list[SceneObject]:
    """A random scene of 1..``max_objects`` distinct shapes with distinct colours (neglect: the
    first large, the others small)."""
    n = 1 if rng.random() < cfg.single_object else rng.randint(2, cfg.max_objects)
    if cfg.regime == "neglect":
        return salient_scene(rng, n - 1, cfg.max_objects)
    shapes, colors = rng.sample(SHAPES, n), rng.sample(list(COLORS), n)
    columns = rng.sample(range(cfg.max_objects), n)
    return [
        SceneObject(s, c, "large", col, rng.uniform(0.3, 0.7))
        for s, c, col in zip(shapes, colors, columns, strict=True)
    ]


def batch(cfg: AltTextConfig, index: int, size: int) -> tuple[np.ndarray, list[str]]:
    """Batch ``index`` of the stream: (normalised images [size, 3, H, W] float32, captions)."""
    rng = random.Random(f"{cfg.seed}-{index}")
    noise_rng = np.random.default_rng([cfg.seed, index])
    images, texts = [], []
    for _ in range(size):
        objects = sample(rng, cfg)
        images.append(normalise(render(objects, cfg.image_size, cfg.max_objects, noise_rng, cfg.noise)))
        texts.append(alt_text(objects, rng, cfg.regime))
    return np.stack(images), texts
