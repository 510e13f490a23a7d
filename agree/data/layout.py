"""Where the release's files lie under a dataset root and a Visual Genome root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agree.data.json_lines import check_name
from agree.data.pixels import OPENAI_MEAN, OPENAI_STD


def resolve_path(path: str | os.PathLike) -> Path:
    """A user path, relative to the launch directory (Hydra does not change it; we never chdir)."""
    return Path(path).expanduser().resolve()


@dataclass(frozen=True)
class ReleaseLayout:
    """Relative paths of the reference release under a dataset root (and a Visual Genome root)."""

    root: Path
    vg_root: Path
    image_size: int = 224
    prefix: str = "flickr30k"
    mean: tuple[float, ...] = OPENAI_MEAN  # the npz images' normalisation: the model's
    std: tuple[float, ...] = OPENAI_STD

    def __post_init__(self) -> None:
        check_name(self.prefix, "prefix")  # it becomes part of every file name

    def annotation(self, name: str) -> Path:
        return self.root / "annotation" / f"{self.prefix}_{name}"

    @property
    def train_records(self) -> Path:
        return self.annotation("train_pred.jsonl")

    @property
    def val_records(self) -> Path:
        return self.annotation("val.json")

    def images_npz(self, split: str) -> Path:
        return self.annotation(f"{split}_images.npz")

    @property
    def images_preprocessing(self) -> Path:
        """What ``agree.prepare karpathy`` made the npz images for (model, size, mean, std)."""
        return self.annotation("images_preprocessing.json")

    @property
    def test_texts(self) -> Path:
        return self.annotation("test_texts.jsonl")

    @property
    def test_images(self) -> Path:
        return self.annotation("test_images.jsonl")

    @property
    def test_text_segs(self) -> Path:
        return self.annotation("test_texts_segs.jsonl")

    @property
    def grounding_npz(self) -> Path:
        return self.root / f"{self.prefix}_visual_grounding.{self.image_size}.npz"

    def image_objects(self, split: str) -> Path:
        return self.root / "objects" / f"{self.prefix}_{split}_imgs_objs.jsonl"

    @property
    def vg_images_npz(self) -> Path:
        return self.vg_root / f"VG_images.{self.image_size}.npz"

    @property
    def vg_mask_images_npz(self) -> Path:
        return self.vg_root / f"VG_mask_images.{self.image_size}.npz"

    @property
    def vg_vocab(self) -> Path:
        return self.vg_root / "vocab_VG_images_objs.jsonl"
