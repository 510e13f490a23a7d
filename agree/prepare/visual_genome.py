"""``visual-genome``: the Visual Genome entity bank and the per-image object lists.

    python -m agree.prepare visual-genome objects=VG/objects.json images=VG/images root=out

The vocabulary is the VG object names (lower-cased, up to ``max_name_words`` words) that end some
entity (``segs``) of a Flickr image: "shirt" and "yellow shirt" for "a yellow shirt", never "a".
Per word, the ``images_per_word`` VG images where its largest box is largest give the bank:
``VG_images.<size>.npz`` (key: VG image id),
``VG_mask_images.<size>.npz`` (key ``"{word}_{vg_id}"``: that box blanked) and
``vocab_VG_images_objs.jsonl`` (``{"vocab": word, "objects": [{"image_id", "object": region}]}``).
``objects/<prefix>_{train,test}_imgs_objs.jsonl`` list each Flickr image's words (train from the
train jsonl's ``segs``, test from the test ``texts_segs``; run ``entities`` on both first).
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from agree.atomic import write_jsonl
from agree.data.json_lines import check_fields, json_id, read_json
from agree.data.layout import ReleaseLayout
from agree.data.records import read_test_images, read_text_segs, read_train_records
from agree.errors import DataFormatError
from agree.prepare.images import ImageOptions, Preprocess, load_image
from agree.prepare.shards import ShardResult, Shards

WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@dataclass
class Config(ImageOptions):
    objects: str = MISSING  # VG's objects.json
    images: str = MISSING  # the VG image folder (<id>.jpg in it or one level down: VG_100K/, VG_100K_2/)
    root: str = MISSING  # the release folder whose entities are matched (writes objects/ there)
    vg_root: str | None = None  # where the bank goes; null: <root>/../VG
    prefix: str = "flickr30k"
    images_per_word: int = 5
    max_name_words: int = 3


def words(text: str) -> tuple[str, ...]:
    return tuple(WORD.findall(text.lower()))


@dataclass(frozen=True)
class Region:
    vg_id: int
    region: dict  # the VG object: x, y, w, h, names, ...

    @property
    def area(self) -> int:
        return self.region["w"] * self.region["h"]


def read_objects(path: str | Path, max_name_words: int) -> dict[str, list[Region]]:
    """{name: its largest region in each VG image having it}, from objects.json (validated)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of {{image_id, objects}} (VG objects.json)")
    largest: dict[str, dict[int, Region]] = defaultdict(dict)
    for i, image in enumerate(data):
        where = f"{path}: element {i}"
        check_fields(image, {"image_id": int, "objects": list}, where)
        for j, obj in enumerate(image["objects"]):
            check_fields(
                obj, {"x": int, "y": int, "w": int, "h": int, "names": list}, f"{where}.objects[{j}]"
            )
            region = Region(image["image_id"], obj)
            for name in obj["names"]:
                key = " ".join(words(str(name)))
                if key and len(key.split()) <= max_name_words and region.area > 0:
                    best = largest[key].get(region.vg_id)
                    if best is None or region.area > best.area:
                        largest[key][region.vg_id] = region
    if not largest:
        raise DataFormatError(f"{path}: no objects with names and non-empty boxes")
    return {name: list(by_image.values()) for name, by_image in largest.items()}


def flickr_entities(layout: ReleaseLayout) -> dict[str, dict[str, list[str]]]:
    """{split: {flickr id: entities}}: train from the train jsonl, test from texts_segs (if present)."""
    train: dict[str, list[str]] = defaultdict(list)
    for record in read_train_records(layout.train_records):
        train[record.flickr_id] += record.segs
    if not any(train.values()):
        raise DataFormatError(
            f"{layout.train_records}: no 'segs'; run `python -m agree.prepare entities` first"
        )
    out = {"train": dict(train)}
    if layout.test_text_segs.is_file():
        segs = read_text_segs(layout.test_text_segs)
        out["test"] = {
            image.image_id: [e for q in image.query_ids for e in segs.get(q, [])]
            for image in read_test_images(layout.test_images)
        }
    return out


def match(entities: list[str], names: set[str], max_words: int) -> list[str]:
    """The names that end some entity (its head noun, with up to ``max_words`` words), sorted."""
    found = set()
    for entity in entities:
        tokens = words(entity)
        found.update(" ".join(tokens[-n:]) for n in range(1, min(max_words, len(tokens)) + 1))
    return sorted(found & names)


def index_images(folder: Path) -> dict[int, Path]:
    """{VG id: file} of the ``<id>.jpg`` files in ``folder`` and its subfolders one level down."""
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: image folder not found")
    out = {}
    for directory in [folder, *(p for p in folder.iterdir() if p.is_dir())]:
        with os.scandir(directory) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in (".jpg", ".jpeg", ".png") and stem.isdigit():
                    out[int(stem)] = Path(entry.path)
    return out


@dataclass(frozen=True)
class EncodeBank:
    """Shard work: ``{"vg_id", "file", "objects": [[word, region]]}`` -> images and masked images."""

    preprocess: Preprocess

    def __call__(self, items: Sequence[dict]) -> ShardResult:
        pre = self.preprocess
        rows, images, masks = [], {}, {}
        for item in items:
            image = load_image(item["file"])
            pixels = pre.pixels(image)
            kept = []
            for word, r in item["objects"]:
                blank = pre.map_box(image.size, (r["x"], r["y"], r["x"] + r["w"], r["y"] + r["h"]))
                if blank is not None:
                    masks[f"{word}_{item['vg_id']}"] = pre.array(pixels, blank)
                    kept.append(word)
            if kept:
                images[str(item["vg_id"])] = pre.array(pixels)
            rows.append({"kept": kept})
        return ShardResult(rows=rows, arrays={"images": images, "masks": masks})


def bank_items(
    regions: dict[str, list[Region]], vocab: list[str], per_word: int, files: dict[int, Path], folder: Path
) -> list[dict]:
    """One item per VG image (by id): the (word, region) pairs of the words whose bank it is in;
    ``files``: the images found in ``folder`` (``index_images``)."""
    pairs: dict[int, list] = defaultdict(list)
    for word in vocab:
        for region in sorted(regions[word], key=lambda r: (-r.area, r.vg_id))[:per_word]:
            pairs[region.vg_id].append([word, region.region])
    missing = sorted(set(pairs) - set(files))
    if missing:
        raise DataFormatError(
            f"{folder}: VG image {missing[0]}.jpg not found, in it or a folder in it ({len(missing)} of "
            f"{len(pairs)} bank images missing): set images= to the folder holding VG's images "
            "(VG_100K/ and VG_100K_2/, or their files)"
        )
    return [{"vg_id": i, "file": str(files[i]), "objects": pairs[i]} for i in sorted(pairs)]


def run(cfg: Config) -> ReleaseLayout:
    preprocess = cfg.preprocess()
    root = Path(cfg.root)
    vg_root = Path(cfg.vg_root) if cfg.vg_root else root.parent / "VG"
    layout = ReleaseLayout(root, vg_root, preprocess.size, cfg.prefix)
    regions = read_objects(cfg.objects, cfg.max_name_words)
    entities = flickr_entities(layout)
    names = set(regions)
    matched = {
        split: {image: match(ents, names, cfg.max_name_words) for image, ents in by_image.items()}
        for split, by_image in entities.items()
    }
    vocab = sorted({w for by_image in matched.values() for ws in by_image.values() for w in ws})
    folder = Path(cfg.images)
    items = bank_items(regions, vocab, cfg.images_per_word, index_images(folder), folder)
    shards = Shards(
        layout.vg_mask_images_npz, items, cfg.shard_size, {"step": "visual-genome", **preprocess.params()}
    )
    shards.run(EncodeBank(preprocess), "visual genome", "img")
    bank: dict[str, list[dict]] = defaultdict(list)
    for item, row in zip(items, shards.rows(), strict=True):
        for word, region in item["objects"]:
            if word in row["kept"]:
                bank[word].append({"image_id": item["vg_id"], "object": region})
    shards.merge_npz("images", layout.vg_images_npz)
    masks = shards.merge_npz("masks", layout.vg_mask_images_npz)
    write_jsonl(layout.vg_vocab, [{"vocab": w, "objects": bank[w]} for w in sorted(bank)])
    for split, by_image in matched.items():
        rows = [
            {"image_id": json_id(image), "image_objects": [w for w in ws if w in bank]}
            for image, ws in by_image.items()
        ]
        write_jsonl(layout.image_objects(split), rows)
    shards.remove()
    print(f"visual-genome: {len(bank)} words, {masks} masked VG images -> {vg_root}", file=sys.stderr)
    return layout
