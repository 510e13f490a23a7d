"""Throughput of each data-preparation step on this machine, from the real samples in shared/data.

    python scripts/bench_prepare.py [--data ../shared/data] [--copies 32] [--ground-images 4]

- karpathy: images/s, ViT-L/14 preprocessing at 336 and 224 px, the 8 real Flickr30k JPEGs
  (375-500 px) copied ``--copies`` times.
- entities: captions/s, en_core_web_sm over the 5,000 Flickr30k test captions.
- ground: images/s with random-init OWLv2 B/16 at 960 px and OWL-ViT B/32 at 768 px, the
  architectures of google/owlv2-base-patch16-ensemble and google/owlvit-base-patch32 (the same
  compute, no download), querying every entity of the images' captions (``--ground-images``).
- visual-genome: images/s over VG images 1-100 (real objects.json; JPEGs of the real sizes made here).

Model loading is excluded (done before the clock starts); everything else a step does is timed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from agree.atomic import write_jsonl  # noqa: E402
from agree.data.npz_images import NpzImages  # noqa: E402
from agree.prepare import entities, ground, karpathy, visual_genome  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def karpathy_json(data: Path, out: Path, copies: int) -> tuple[Path, Path]:
    """A Karpathy JSON over the 8 real JPEGs, each copied ``copies`` times (captions from multi30k)."""
    images = out / "flickr30k-images"
    images.mkdir(parents=True)
    with open(data / "flickr30k_captions_multi30k" / "test_1k_captions.tsv", encoding="utf-8") as f:
        captions = [row["caption"] for row in csv.DictReader(f, delimiter="\t")]
    jpgs = sorted((data / "flickr30k_entities_8_images" / "images").glob("*.jpg"))
    entries = []
    for i in range(copies * len(jpgs)):
        name = f"{i + 1}{jpgs[i % len(jpgs)].name}"
        shutil.copy(jpgs[i % len(jpgs)], images / name)
        split = "train" if i % 8 < 6 else ("val" if i % 8 == 6 else "test")
        sentences = [{"raw": c} for c in captions[5 * i : 5 * i + 5]]
        entries.append({"filename": name, "split": split, "sentences": sentences})
    path = out / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path, images


def vg_images(data: Path, out: Path) -> Path:
    """JPEGs of the real sizes (smooth random content) for the VG sample's images."""
    folder = out / "VG_100K"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for meta in json.loads((data / "visual_genome_samples" / "image_data.json_samples.json").read_text()):
        w, h = meta["width"], meta["height"]
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"{meta['image_id']}.jpg")
    return out


def owl_base(folder: Path, version: str) -> Path:
    """A random-init OWL base model with its processor (a character-level tokenizer: same compute)."""
    import transformers

    vocab = {}
    for c in string.ascii_lowercase + string.digits + "-',.":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    names, size, patch = {"owlv2": ("Owlv2", 960, 16), "owlvit": ("OwlViT", 768, 32)}[version]
    config = getattr(transformers, f"{names}Config")(
        text_config={"bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1},
        vision_config={"image_size": size, "patch_size": patch},
    )
    getattr(transformers, f"{names}ForObjectDetection")(config).save_pretrained(folder)
    hw = {"height": size, "width": size}
    image_processor = getattr(transformers, f"{names}ImageProcessor")(size=hw, crop_size=hw)
    getattr(transformers, f"{names}Processor")(
        image_processor=image_processor, tokenizer=tokenizer
    ).save_pretrained(folder)
    return folder


def timed(label: str, count: int | Callable[[Any], int], unit: str, step, cfg) -> None:
    """Run ``step`` with ``cfg`` and print items per second (``count`` may read the step's result)."""
    start = time.perf_counter()
    result = step.run(cfg)
    seconds = time.perf_counter() - start
    count = count(result) if callable(count) else count
    print(f"{label:<44} {count:>6} {unit:<9} {seconds:7.1f} s  {count / seconds:8.2f} {unit}/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--copies", type=int, default=32, help="copies of the 8 real JPEGs for karpathy")
    parser.add_argument("--ground-images", type=int, default=4, help="images for the ground step")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, images = karpathy_json(args.data, tmp / "raw", args.copies)
        root = tmp / "flickr30k"
        for model in ("ViT-L-14-336-quickgelu", "ViT-L-14-quickgelu"):  # the 224 px files stay for the rest
            cfg = karpathy.Config(karpathy=str(source), images=str(images), root=str(root), model=model)
            timed(f"karpathy ({model})", 8 * args.copies, "images", karpathy, cfg)

        texts = root / "annotation" / "flickr30k_test_texts.jsonl"
        with open(args.data / "flickr30k_captions_multi30k" / "test_1k_captions.tsv", encoding="utf-8") as f:
            rows = [
                {"query_id": i, "query_text": r["caption"], "item_ids": [0]}
                for i, r in enumerate(csv.DictReader(f, delimiter="\t"))
            ]
        texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        entities.load_pipeline("en_core_web_sm")
        timed("entities (en_core_web_sm)", len(rows), "captions", entities, entities.Config(input=str(texts)))

        train = root / "annotation" / "flickr30k_train_pred.jsonl"
        entities.run(entities.Config(input=str(train)))
        subset = root / "annotation" / "ground_subset.jsonl"  # the first --ground-images images
        queries = list(ground.queries_per_image(ground.read_segmented(train), 7).items())[
            : args.ground_images
        ]
        write_jsonl(subset, [r for r in ground.read_segmented(train) if r["image"] in dict(queries)])
        per_image = sum(len(q) for _, q in queries) / len(queries)
        for version in ("owlv2", "owlvit"):
            detector = str(owl_base(tmp / version, version))
            ground.load_detector(detector, "cpu")
            cfg = ground.Config(
                root=str(root), images=str(images), input=str(subset), detector=detector, device="cpu"
            )
            timed(
                f"ground ({version} base, {per_image:.0f} entities/image)",
                len(queries),
                "images",
                ground,
                cfg,
            )

        objects = args.data / "visual_genome_samples" / "objects.json_samples.json"
        vg = vg_images(args.data, tmp / "vg")
        cfg = visual_genome.Config(objects=str(objects), images=str(vg), root=str(root), images_per_word=100)
        timed(
            "visual-genome (all images of matched words)",
            lambda layout: len(NpzImages(layout.vg_images_npz, 224)),
            "images",
            visual_genome,
            cfg,
        )


if __name__ == "__main__":
    main()
