"""``karpathy``: the annotation files and npz images of a Karpathy split (Flickr30k, COCO).

    python -m agree.prepare karpathy karpathy=dataset_flickr30k.json images=flickr30k-images root=out

Writes under ``root``: ``annotation/<prefix>_train_pred.jsonl`` (no ``segs``/``preds`` yet: the
``entities`` and ``ground`` steps add them), ``<prefix>_val.json``, ``<prefix>_test_texts.jsonl``,
``<prefix>_test_images.jsonl``, ``<prefix>_{train,val,test}_images.npz`` and
``<prefix>_images_preprocessing.json`` (the model, size, mean and std the npz images were made
for; training and evaluation check them against their model). npz keys: the image's index in its
split (train, val), its file stem (test). Annotation ``image`` fields are
``<images folder name>/[filepath/]filename``, as the release's ``flickr30k-images/1000092795.jpg``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from omegaconf import MISSING

from agree.atomic import replace_as_set, staging_dir, write_json, write_jsonl
from agree.data.json_lines import canonical_id, check_fields, check_name, json_id, read_json, show
from agree.data.layout import ReleaseLayout
from agree.errors import ConfigError, DataFormatError
from agree.prepare.images import EncodeImages, ImageOptions, Preprocess
from agree.prepare.shards import Shards

SPLITS = ("train", "restval", "val", "test")


@dataclass
class Config(ImageOptions):
    karpathy: str = MISSING  # dataset_flickr30k.json / dataset_coco.json
    images: str = MISSING  # the image folder (COCO: the one holding train2014/ and val2014/)
    root: str = MISSING  # the release folder to write
    prefix: str | None = None  # file-name prefix; null: the JSON's "dataset" (flickr30k, coco)
    restval: bool = False  # COCO: the restval images join train
    overwrite: bool = False  # replace existing outputs (their segs and preds are lost)


@dataclass(frozen=True)
class KarpathyImage:
    split: str
    image: str  # the annotation's "image" field
    path: Path  # the image file
    captions: tuple[str, ...]

    @property
    def stem(self) -> str:
        return Path(self.image).stem


def read_karpathy(path: str | Path, images: Path) -> tuple[str | None, list[KarpathyImage]]:
    """(the JSON's "dataset", its images), validated: one-line errors name the element."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFormatError(f"{path}: expected a Karpathy-split JSON object with an 'images' list")
    out = []
    for i, item in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        check_fields(item, {"filename": str, "split": str, "sentences": list}, where)
        if item["split"] not in SPLITS:
            raise DataFormatError(f"{where}: split {item['split']!r} is not one of {SPLITS}")
        captions = []
        for j, sentence in enumerate(item["sentences"]):
            check_fields(sentence, {"raw": str}, f"{where}.sentences[{j}]")
            captions.append(sentence["raw"].strip())
        if not captions:
            raise DataFormatError(f"{where}: no sentences")
        relative = PurePosixPath(item.get("filepath", "")) / item["filename"]
        if relative.is_absolute() or ".." in relative.parts:
            raise DataFormatError(f"{where}: {show(relative.as_posix())} leaves the image folder")
        image = f"{images.name}/{relative.as_posix()}"
        out.append(KarpathyImage(item["split"], image, images / relative, tuple(captions)))
    dataset = data.get("dataset")
    return None if dataset is None else check_name(dataset, f"{path}: 'dataset'"), out


def by_split(images: list[KarpathyImage], restval: bool, path: str | Path) -> dict[str, list[KarpathyImage]]:
    """train (with restval if asked), val and test; each must be non-empty, test stems unique."""
    splits = defaultdict(list)
    for image in images:
        split = "train" if image.split == "restval" and restval else image.split
        splits[split].append(image)
    for split in ("train", "val", "test"):
        if not splits[split]:
            raise DataFormatError(f"{path}: no {split!r} images")
    return {split: splits[split] for split in ("train", "val", "test")}


def check_unique(images: list[KarpathyImage], path: str | Path) -> None:
    """Each image once, each image id once, over every split.

    An image in two splits leaks test images into training; two files of one id (``0042.jpg`` and
    ``42.jpg``: ids compare as integers) would share the test npz key, the object lists and the
    grounded masks.
    """
    seen: dict[str, int] = {}
    for i, image in enumerate(images):
        j = seen.setdefault(canonical_id(image.stem), i)
        if j == i:
            continue
        first = images[j]
        where = f"{path}: images[{j}] and images[{i}]"
        if first.image == image.image:
            splits = (
                f"twice in split {first.split!r}"
                if first.split == image.split
                else (f"in split {first.split!r} and in {image.split!r}")
            )
            raise DataFormatError(
                f"{where} are the same image {show(image.image)}, {splits}: keep each image once, in one "
                "split (a test image seen in training inflates the recalls)"
            )
        raise DataFormatError(
            f"{where} ({show(first.image)} and {show(image.image)}) have the same image id "
            f"{show(canonical_id(image.stem))} (the file stem, compared as an integer): rename one of them"
        )


def check_files(splits: dict[str, list[KarpathyImage]], source: str | Path, folder: Path) -> None:
    missing = [image.path for images in splits.values() for image in images if not image.path.is_file()]
    if missing:
        total = sum(map(len, splits.values()))
        raise DataFormatError(
            f"{missing[0]}: image not found ({len(missing)} of {total} images of {source} not in {folder})"
        )


def write_annotations(layout: ReleaseLayout, splits: dict[str, list[KarpathyImage]]) -> None:
    train = [
        {"image": image.image, "caption": caption, "image_id": index}
        for index, image in enumerate(splits["train"])
        for caption in image.captions
    ]
    write_jsonl(layout.train_records, train)
    val = [{"image": image.image, "caption": list(image.captions)} for image in splits["val"]]
    write_json(layout.val_records, val)
    texts, images = [], []
    for image in splits["test"]:
        image_id = json_id(image.stem)
        first = len(texts)
        for j, caption in enumerate(image.captions):
            texts.append({"query_id": first + j, "query_text": caption, "item_ids": [image_id]})
        images.append({"image_id": image_id, "item_ids": list(range(first, len(texts)))})
    write_jsonl(layout.test_texts, texts)
    write_jsonl(layout.test_images, images)


def outputs(layout: ReleaseLayout) -> list[Path]:
    """The files ``karpathy`` writes, all under ``root/annotation``; the train records last."""
    return [
        layout.val_records,
        layout.test_texts,
        layout.test_images,
        *(layout.images_npz(split) for split in ("train", "val", "test")),
        layout.images_preprocessing,
        layout.train_records,
    ]


def run(cfg: Config) -> ReleaseLayout:
    """Check and encode everything, then write the annotations and npz files as one set.

    They go to a staging folder and replace the files of ``root/annotation`` together
    (``agree.atomic.replace_as_set``): a crash never leaves new annotations beside old images.
    """
    folder = Path(cfg.images)
    dataset, images = read_karpathy(cfg.karpathy, folder)
    check_unique(images, cfg.karpathy)
    splits = by_split(images, cfg.restval, cfg.karpathy)
    check_files(splits, cfg.karpathy, folder)
    model, weights, image_size = cfg.model_keys()
    preprocess = Preprocess.for_model(model, weights, image_size)
    root = Path(cfg.root)
    layout = ReleaseLayout(root, root.parent / "VG", preprocess.size, cfg.prefix or dataset or "flickr30k")
    existing = [path for path in outputs(layout) if path.exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(
            f"{existing[0]} exists ({len(existing)} of the outputs do); "
            "set overwrite=true to replace them (with any segs and preds added since)"
        )
    encoded = {}
    for split, members in splits.items():  # every image encoded before any output is written
        keys = [image.stem if split == "test" else str(i) for i, image in enumerate(members)]
        items = [[key, str(image.path)] for key, image in zip(keys, members, strict=True)]
        shards = Shards(
            layout.images_npz(split), items, cfg.shard_size, {"step": "karpathy", **preprocess.params()}
        )
        shards.run(EncodeImages(preprocess), f"{split} images", "img")
        encoded[split] = shards
    staged = staging_dir(root, "karpathy")
    staged_layout = dataclasses.replace(layout, root=staged)
    write_annotations(staged_layout, splits)
    for split, shards in encoded.items():
        shards.merge_npz("images", staged_layout.images_npz(split))
    made = {"model": model, "pretrained": weights, "image_size": preprocess.size}
    write_json(staged_layout.images_preprocessing, {**made, "mean": preprocess.mean, "std": preprocess.std})
    replace_as_set(
        staged / "annotation",
        root / "annotation",
        [p.name for p in outputs(layout)],
        layout.train_records.name,
    )
    staged.rmdir()
    for shards in encoded.values():
        shards.remove()
    counts = ", ".join(f"{split} {len(members)}" for split, members in splits.items())
    print(f"karpathy: {counts} images ({preprocess.size} px) -> {layout.root}", file=sys.stderr)
    return layout
