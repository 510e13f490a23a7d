"""torch Datasets over the reference formats, and their collate functions."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from agree.data.entities import PROMPT_TEMPLATE, kept_entities, slot_mask
from agree.data.npz_images import NpzImages
from agree.data.pixels import black
from agree.data.records import NO_GROUNDING_LABEL, TrainRecord, ValRecord
from agree.data.swaps import swapped_caption

Tokenizer = Callable[[list[str]], torch.Tensor]


def mask_entity(caption: str, entity: str, ignore_case: bool = True) -> str:
    """``caption`` with every occurrence of ``entity`` replaced by ``[MASK]``.

    Entities are lower-cased, so by default case is ignored ("Four men" is masked for "four men");
    ``ignore_case=False`` is the release's ``caption.replace(entity, "[MASK]")``.
    """
    if not ignore_case:
        return caption.replace(entity, "[MASK]")
    return re.sub(re.escape(entity), "[MASK]", caption, flags=re.IGNORECASE)


def slot_texts(
    caption: str, entities: list[str], slots: int, ignore_case: bool = True, encode_empty_slots: bool = False
) -> tuple[list[str], list[str]]:
    """(entity prompts, entity-masked captions) of a caption's first ``slots`` entities.

    With ``encode_empty_slots`` both lists are padded to ``slots`` with ``""``, as the release
    does (it then encodes and counts the padding).
    """
    kept = entities[:slots]
    empty = [""] * (slots - len(kept)) if encode_empty_slots else []
    prompts = [PROMPT_TEMPLATE.format(entity=e) for e in kept] + empty
    return prompts, [mask_entity(caption, e, ignore_case) for e in kept] + empty


def token_lengths(tokens: torch.Tensor) -> tuple[int, ...]:
    """Each row's positions up to its last non-zero token, on the host: open_clip's tokenizers pad
    with 0 after the end token (the one the text tower pools), so a tower cut there sees every
    real token (``clip.encode_text``); a row of zeros keeps its whole length."""
    real = tokens.numpy() != 0
    return tuple((real.shape[1] - real[:, ::-1].argmax(1)).tolist())


def text_key(text: str) -> int:
    """A stable id of a text (the same on every rank), to spot duplicate pairs in a batch."""
    return zlib.crc32(text.encode("utf-8"))


@dataclass
class EntitySources:
    """The entity-level inputs of the release (only those the enabled losses need are set)."""

    grounding: NpzImages | None = None  # "{flickr_id}_{label}" -> image with that region blanked
    image_objects: dict[str, list[str]] | None = None  # flickr_id -> VG vocabulary words
    vg_ids: dict[str, list[str]] | None = None  # word -> VG image ids
    vg_images: NpzImages | None = None
    vg_masked: NpzImages | None = None  # "{word}_{vg_id}" -> VG image with the word's region blanked


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random draws of one item in one epoch: the same in every process and on resume."""
    return torch.Generator().manual_seed(hash((seed, epoch, index)) & 0xFFFF_FFFF_FFFF_FFFF)


FALLBACK_MASKS = ("black", "clipped_grey")


def random_square(
    image: torch.Tensor,
    side: int,
    generator: torch.Generator | None = None,
    style: str = "black",
    black_pixel: Sequence[float] | None = None,
) -> torch.Tensor:
    """The fallback mask: ``image`` with a ``side``×``side`` square blanked at a random place.

    ``black``: black pixels (``black_pixel``, black in the images' normalisation; default CLIP's),
    the whole square inside the image. ``clipped_grey``: the release's square, 0 in normalised
    space (the mean colour), its top-left corner anywhere in the image, so it is clipped at the
    right and bottom borders.
    """
    if style not in FALLBACK_MASKS:
        raise ValueError(f"fallback mask {style!r}: choose one of {FALLBACK_MASKS}")
    size = image.shape[-1]
    high = size if style == "clipped_grey" else size - side + 1
    y, x = (int(v) for v in torch.randint(0, high, (2,), generator=generator))
    pixel = (black() if black_pixel is None else black_pixel) if style == "black" else (0.0, 0.0, 0.0)
    masked = image.clone()
    masked[:, y : y + side, x : x + side] = torch.as_tensor(pixel, dtype=image.dtype)[
        :, None, None
    ]  # clipped
    return masked


class TrainCaptions(Dataset):
    """One item per training caption: its image and text, and the entity inputs in ``needs``.

    Entities longer than ``max_entity_words`` words are dropped and at most ``max_entities``
    kept. Without a VG object for the image (or a grounded entity), the sample's own image and
    caption stand in, with a random square (32 px at 224, ``fallback_mask`` style) as the mask.

    With ``swaps`` needed, an item carries its caption with two entities' attributes or spans
    exchanged (``agree.data.swaps``), or None when it has fewer than two entities.

    Items are looked up by index or by ``(index, epoch)`` (``datamodule.EpochSampler``); the
    random draws (VG image, square, swap) come from ``item_generator(seed, epoch, index)``, so a
    resumed run draws what an uninterrupted one would.
    """

    def __init__(
        self,
        records: Sequence[TrainRecord],
        images: NpzImages,
        needs: frozenset[str] = frozenset(),
        sources: EntitySources | None = None,
        max_entities: int = 5,
        max_entity_words: int = 7,
        seed: int = 0,
        fallback_mask: str = "black",
        black_pixel: Sequence[float] | None = None,
    ):
        images.require([r.image_key for r in records], "train image_id")
        self.seed, self.fallback_mask = seed, fallback_mask
        self.black_pixel = black_pixel  # black in the images' normalisation (the fallback square)
        self.records, self.images, self.needs = records, images, needs
        self.sources = sources or EntitySources()
        self.max_entities, self.max_entity_words = max_entities, max_entity_words
        self.square = max(1, round(32 * images.shape[-1] / 224))
        if "ground_masked" in needs:
            keys = [f"{r.flickr_id}_{label}" for r in records if (label := grounded_label(r)) is not None]
            self.sources.grounding.require(keys, "grounded entity")
        if "vg" in needs:
            self.sources.vg_images.require(
                sorted({i for ids in self.sources.vg_ids.values() for i in ids}), "VG image"
            )
        if "vg_masked" in needs:
            keys = [f"{word}_{i}" for word, ids in self.sources.vg_ids.items() for i in ids]
            self.sources.vg_masked.require(keys, "VG mask")

    def __len__(self) -> int:
        return len(self.records)

    def entities(self, record: TrainRecord) -> list[str]:
        return kept_entities(record.segs, self.max_entity_words, self.max_entities)

    def _vg_draw(self, record: TrainRecord, generator: torch.Generator) -> tuple[str, str] | None:
        """A random (word, VG image id) among the image's objects that have VG images."""
        words = [
            w for w in self.sources.image_objects.get(record.flickr_id, []) if self.sources.vg_ids.get(w)
        ]
        if not words:
            return None
        word = words[int(torch.randint(len(words), (), generator=generator))]
        ids = self.sources.vg_ids[word]
        return word, ids[int(torch.randint(len(ids), (), generator=generator))]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        generator = item_generator(self.seed, epoch, index)
        record = self.records[index]
        image = torch.from_numpy(self.images[record.image_key]).float()
        item = {"image": image, "caption": record.caption, "image_key": int(record.image_key)}
        if self.needs & {"prompts", "masked_captions"}:
            item["entities"] = self.entities(record)
        if "vg" in self.needs:
            drawn = self._vg_draw(record, generator)
            if drawn is None:
                item["vg_image"], item["vg_text"] = image, record.caption
                item["vg_masked"] = random_square(
                    image, self.square, generator, self.fallback_mask, self.black_pixel
                )
            else:
                word, vg_id = drawn
                item["vg_image"] = torch.from_numpy(self.sources.vg_images[vg_id]).float()
                item["vg_text"] = PROMPT_TEMPLATE.format(entity=word)
                if "vg_masked" in self.needs:
                    item["vg_masked"] = torch.from_numpy(self.sources.vg_masked[f"{word}_{vg_id}"]).float()
        if "ground_masked" in self.needs:
            label = grounded_label(record)
            item["ground_masked"] = (
                random_square(image, self.square, generator, self.fallback_mask, self.black_pixel)
                if label is None
                else torch.from_numpy(self.sources.grounding[f"{record.flickr_id}_{label}"]).float()
            )
        if "swaps" in self.needs:  # drawn last: the other draws are those of a run without swaps
            item["swap"] = swapped_caption(record.caption, self.entities(record), generator)
        return item


def grounded_label(record: TrainRecord) -> str | None:
    """The first grounded entity with a specific label (not "object"), if any."""
    return next((label for label, _ in record.preds if label != NO_GROUNDING_LABEL), None)


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


def tokenize_into(batch: dict, tokenizer: Tokenizer, key: str, texts: list[str]) -> None:
    """``batch[key]``: the token ids of ``texts``; ``batch["text_lengths"][key]``: their
    ``token_lengths``, plain ints that stay on the host when the batch moves to the device."""
    tokens = tokenizer(texts) if texts else batch["captions"][:0]
    batch[key] = tokens
    batch.setdefault("text_lengths", {})[key] = token_lengths(tokens)


class CollateTrain:
    """Stack images, tokenize texts, and lay entity slots out as [B, max_entities] with a mask.

    Only valid slots are tokenized (and later encoded): padding never becomes text, unless
    ``encode_empty_slots`` (the release), where every empty slot is the text ``""``, counted as
    a real slot.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        needs: frozenset[str] = frozenset(),
        max_entities: int = 5,
        mask_ignore_case: bool = True,
        encode_empty_slots: bool = False,
    ):
        self.tokenizer, self.needs, self.max_entities = tokenizer, needs, max_entities
        self.slot_options = {"ignore_case": mask_ignore_case, "encode_empty_slots": encode_empty_slots}

    def __call__(self, items: list[dict]) -> dict:
        batch = {
            "images": torch.stack([it["image"] for it in items]),
            "image_keys": torch.tensor([it["image_key"] for it in items]),
            "caption_keys": torch.tensor([text_key(it["caption"]) for it in items]),
        }
        tokenize_into(batch, self.tokenizer, "captions", [it["caption"] for it in items])
        if "entities" in items[0]:
            prompts, masked, entities, counts = [], [], [], []
            for it in items:
                item_prompts, item_masked = slot_texts(
                    it["caption"], it["entities"], self.max_entities, **self.slot_options
                )
                n = len(item_prompts)
                counts.append(n)
                entities += (it["entities"][:n] + [""] * n)[:n]  # padding slots hold ""
                prompts += item_prompts
                masked += item_masked
            valid = slot_mask(counts, self.max_entities)
            keys = torch.full(valid.shape, -1, dtype=torch.long)
            keys[valid] = torch.tensor([text_key(e) for e in entities], dtype=torch.long)
            batch["entity_valid"], batch["entity_keys"] = valid, keys
            for name, texts in (("prompts", prompts), ("masked_captions", masked)):
                if name in self.needs:
                    tokenize_into(batch, self.tokenizer, name, texts)
        if "vg_image" in items[0]:
            batch["vg_images"] = torch.stack([it["vg_image"] for it in items])
            tokenize_into(batch, self.tokenizer, "vg_prompts", [it["vg_text"] for it in items])
            batch["vg_keys"] = torch.tensor([text_key(it["vg_text"]) for it in items])
        for name in ("vg_masked", "ground_masked"):
            if name in items[0]:
                batch[f"{name}_images"] = torch.stack([it[name] for it in items])
        if "swap" in items[0]:  # only real swaps are tokenized; swap_valid marks whose they are
            swaps = [it["swap"] for it in items if it["swap"] is not None]
            batch["swap_valid"] = torch.tensor([it["swap"] is not None for it in items])
            tokenize_into(batch, self.tokenizer, "swap_captions", swaps)
        return batch


class CollateVal:
    """Stack images, tokenize all captions, and keep the ids recall needs."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        captions = [c for it in items for c in it["captions"]]
        text_ids = [it["first_caption"] + j for it in items for j in range(len(it["captions"]))]
        text_image_ids = [it["image_id"] for it in items for _ in it["captions"]]
        batch = {
            "images": torch.stack([it["image"] for it in items]),
            "image_ids": torch.tensor([it["image_id"] for it in items]),
            "text_ids": torch.tensor(text_ids),
            "text_image_ids": torch.tensor(text_image_ids),
        }
        tokenize_into(batch, self.tokenizer, "captions", captions)
        return batch
