"""Pixel normalisation of the npz images, shared by the scenes generator, the datasets and data preparation,
and its inverse (thumbnails for the report and W&B). OpenAI CLIP's mean and std are the defaults; a
model's own come from open_clip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN (numpy-only here)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN = np.array(OPENAI_MEAN, dtype=np.float32)
CLIP_STD = np.array(OPENAI_STD, dtype=np.float32)


def black(mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """A black pixel [3] after normalisation with ``mean`` and ``std``."""
    return (0.0 - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive-exclusive


def normalise(
    pixels: np.ndarray,
    blank: Box | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """uint8 H×W×3 -> normalised float32 3×H×W, with the ``blank`` box set to black first."""
    pixels = pixels.astype(np.float32) / 255.0
    if blank is not None:
        x0, y0, x1, y1 = blank
        pixels[max(y0, 0) : y1, max(x0, 0) : x1] = 0.0
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1).copy()


def thumbnail(
    image: np.ndarray, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Image.Image:
    """An RGB picture of a normalised [3, S, S] array (``mean``/``std``), resized to ``size`` × ``size``."""
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32).transpose(1, 2, 0) * std + mean
    picture = Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))
    return picture.resize((size, size), Image.Resampling.LANCZOS)
