"""torch Datasets over the reference formats, and their collate functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from agree.data.formats import NpzImages, TrainRecord, ValRecord

Tokenizer = Callable[[list[str]], torch.Tensor]


class TrainCaptions(Dataset):
    """One item per training caption: its image and text."""

    def __init__(self, records: Sequence[TrainRecord], images: NpzImages):
        images.require([r.image_key for r in records], "train image_id")
        self.records, self.images = records, images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {"image": torch.from_numpy(self.images[record.image_key]).float(), "caption": record.caption}


class ValImages(Dataset):
    """One item per validation image with all its captions and their global indices."""

    def __init__(self, records: Sequence[ValRecord], images: NpzImages):
        images.require([r.image_key for r in records], "val image index")
        self.records, self.images = records, images
        counts = torch.tensor([len(r.captions) for r in records])
        self.first_caption = (torch.cumsum(counts, 0) - counts).tolist()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {
            "image": torch.from_numpy(self.images[record.image_key]).float(),
            "image_id": index,
            "captions": list(record.captions),
            "first_caption": self.first_caption[index],
        }


class ImageArrays(Dataset):
    """Images of an npz, in the order of ``keys`` (feature extraction)."""

    def __init__(self, images: NpzImages, keys: Sequence[str], what: str = "image id"):
        images.require(list(keys), what)
        self.images, self.keys = images, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[self.keys[index]]).float()


class CollateTrain:
    """Stack images and tokenize captions of a training batch."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        return {
            "images": torch.stack([it["image"] for it in items]),
            "captions": self.tokenizer([it["caption"] for it in items]),
        }


class CollateVal:
    """Stack images, tokenize all captions, and keep the ids recall needs."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        captions = [c for it in items for c in it["captions"]]
        text_ids = [it["first_caption"] + j for it in items for j in range(len(it["captions"]))]
        text_image_ids = [it["image_id"] for it in items for _ in it["captions"]]
        return {
            "images": torch.stack([it["image"] for it in items]),
            "image_ids": torch.tensor([it["image_id"] for it in items]),
            "captions": self.tokenizer(captions),
            "text_ids": torch.tensor(text_ids),
            "text_image_ids": torch.tensor(text_image_ids),
        }
