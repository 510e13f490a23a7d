"""Evaluate image-text retrieval on the test split, from a checkpoint or a pretrained model.

    python -m agree.evaluate ckpt_path=outputs/train/.../checkpoints/last.ckpt

Writes under ``output_dir``: ``features/`` (binary feature store), ``predictions/`` (reference
JSONL), ``evaluation/`` (reference evaluation JSON per direction) and ``results.json``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from agree.config import ensure_data, resolve_device, resolve_path
from agree.data.datasets import ImageArrays
from agree.data.formats import (
    DataFormatError,
    NpzImages,
    ReleaseLayout,
    TestImage,
    TestText,
    evaluation_json,
    prediction_rows,
    read_test_images,
    read_test_texts,
)
from agree.io import write_json, write_jsonl
from agree.model.clip import create_clip, encode_image, encode_text, get_tokenizer
from agree.retrieval.features import extract, save_features
from agree.retrieval.metrics import KS, positives_from_pairs, recall_at_k, summarise
from agree.retrieval.search import topk_similarity

DIRECTIONS = ("text_to_image", "image_to_text")


def _relevant_pairs(queries, query_index, item_index, files, noun) -> torch.Tensor:
    """[n, 2] (query, item) index pairs; an item absent from the other file is a data error."""
    pairs = []
    for query_id, item_ids in queries:
        for item_id in item_ids:
            if item_id not in item_index:
                raise DataFormatError(
                    f"{files[0]}: {query_id} names {noun} {item_id}, absent from {files[1]}"
                )
            pairs.append((query_index[query_id], item_index[item_id]))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def ground_truth(
    texts: list[TestText], images: list[TestImage], layout: ReleaseLayout
) -> dict[str, torch.Tensor]:
    """Padded positives per direction, checking that both annotation files agree on every id."""
    image_index = {im.image_id: i for i, im in enumerate(images)}
    text_index = {t.query_id: i for i, t in enumerate(texts)}
    files = (layout.test_texts, layout.test_images)
    t2i = _relevant_pairs([(t.query_id, t.image_ids) for t in texts], text_index, image_index, files, "image")
    i2t = _relevant_pairs(
        [(i.image_id, i.query_ids) for i in images], image_index, text_index, files[::-1], "query"
    )
    return {
        "text_to_image": positives_from_pairs(*t2i.unbind(1), len(texts)),
        "image_to_text": positives_from_pairs(*i2t.unbind(1), len(images)),
    }


def encode_test_set(
    model,
    tokenizer,
    texts: list[TestText],
    images: NpzImages,
    image_ids: list[str],
    batch_size: int,
    device: torch.device,
):
    """(text features [T, D], image features [I, D]) on CPU."""
    image_batches = torch.utils.data.DataLoader(
        ImageArrays(images, image_ids, "test image_id"), batch_size=batch_size
    )
    image_features = extract(
        lambda x: encode_image(model, x), image_batches, device, "images", len(image_batches)
    )
    captions = [t.text for t in texts]
    text_batches = [tokenizer(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
    text_features = extract(lambda x: encode_text(model, x), text_batches, device, "texts")
    return text_features, image_features


def evaluate(cfg: DictConfig) -> dict:
    """Extract features, search both directions, score and write every output; return results."""
    L.seed_everything(cfg.seed, verbose=False)
    out = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    layout = ensure_data(cfg.data)
    texts = read_test_texts(layout.test_texts)
    images = read_test_images(layout.test_images)
    positives = ground_truth(texts, images, layout)
    image_ids = [im.image_id for im in images]
    npz = NpzImages(layout.images_npz("test"), layout.image_size)
    npz.require(image_ids, "test image_id")

    pretrained = str(resolve_path(cfg.ckpt_path)) if cfg.ckpt_path else cfg.model.pretrained
    model = create_clip(cfg.model.name, pretrained).to(device).eval()
    text_features, image_features = encode_test_set(
        model, get_tokenizer(cfg.model.name), texts, npz, image_ids, cfg.batch_size, device
    )
    query_ids = [t.query_id for t in texts]

    k = max(cfg.rerank.k, max(KS))
    ranked = {
        "text_to_image": topk_similarity(text_features.to(device), image_features.to(device), k)[1].cpu(),
        "image_to_text": topk_similarity(image_features.to(device), text_features.to(device), k)[1].cpu(),
    }
    results = {"raw": summarise(*(recall_at_k(ranked[d], positives[d]) for d in DIRECTIONS))}

    save_features(out / "features", "images", image_ids, image_features)
    save_features(out / "features", "texts", query_ids, text_features)
    names = {
        "text_to_image": (query_ids, image_ids, "query_id"),
        "image_to_text": (image_ids, query_ids, "image_id"),
    }
    for stage, stage_ranked in {"raw": ranked}.items():
        for direction in DIRECTIONS:
            queries, items, id_key = names[direction]
            lists = [[items[i] for i in row] for row in stage_ranked[direction].tolist()]
            write_jsonl(
                out / "predictions" / f"{stage}_{direction}.jsonl", prediction_rows(id_key, queries, lists)
            )
            write_json(
                out / "evaluation" / f"{stage}_{direction}.json", evaluation_json(results[stage][direction])
            )
    write_json(out / "results.json", results)
    return results


def format_table(results: dict) -> str:
    """A plain-text recall table: one row per stage and direction."""
    lines = [f"{'stage':<13}{'direction':<15}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mR':>7}{'RSUM':>8}"]
    for stage, block in results.items():
        for direction in DIRECTIONS:
            r = block[direction]
            lines.append(
                f"{stage:<13}{direction:<15}{r['r1']:>7.1f}{r['r5']:>7.1f}{r['r10']:>7.1f}{r['mean_recall']:>7.1f}{block['rsum']:>8.1f}"
            )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    results = evaluate(cfg)
    print(format_table(results))
    print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return results["raw"]["rsum"]


if __name__ == "__main__":
    main()
