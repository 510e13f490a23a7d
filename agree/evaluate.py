"""Evaluate image-text retrieval on the test split, with optional re-ranking.

    python -m agree.evaluate ckpt_path=outputs/train/.../checkpoints/last.ckpt [rerank=egr_tbr]

Features come from a model (a checkpoint or ``model.pretrained``) or from reference JSONL
feature files (``features.*``). Writes under ``output_dir``: ``features/`` (binary feature
store), ``predictions/`` (reference JSONL per stage and direction), ``evaluation/`` (reference
evaluation JSON per stage and direction), ``results.json`` and ``report_inputs.json`` (where
``agree.report`` finds the annotations and test images). They are written into a hidden staging
folder first and replace an earlier evaluation's outputs as a set (``agree.io.replace_as_set``).

Model, dataset and Lightning code is imported inside the functions that extract features, so an
evaluation from feature files starts without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agree.cli import user_errors
from agree.config import ensure_data, resolve_device, resolve_path
from agree.data.formats import (
    NpzImages,
    ReleaseLayout,
    TestImage,
    TestText,
    evaluation_json,
    prediction_rows,
    read_entity_feature_jsonl,
    read_feature_jsonl,
    read_test_images,
    read_test_texts,
    read_text_segs,
)
from agree.errors import DataFormatError
from agree.folders import check_entries, claim_entries
from agree.io import replace_as_set, staging_dir, write_json, write_jsonl
from agree.retrieval.features import extract, save_features
from agree.retrieval.metrics import positives_from_pairs, recall_at_k, summarise
from agree.retrieval.pipeline import EntityFeatures, rank_stages
from agree.settings import EvaluateSettings, evaluate_settings

DIRECTIONS = ("text_to_image", "image_to_text")
# what an evaluation writes into its output folder, replaced as a set (results.json last)
OUTPUTS = ("features", "predictions", "evaluation", "report_inputs.json", "results.json")


@dataclass
class TestSet:
    """The test annotations and the features of their texts and images (rows in file order)."""

    texts: list[TestText]
    images: list[TestImage]
    positives: dict[str, torch.Tensor]  # per direction, padded item indices (see ground_truth)
    text_features: torch.Tensor
    image_features: torch.Tensor
    entities: EntityFeatures | None = None
    report_inputs: dict | None = None  # see report_inputs()


# ---------------------------------------------------------------------------------------------
# ground truth


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
    texts: list[TestText], images: list[TestImage], files: tuple[Path, Path]
) -> dict[str, torch.Tensor]:
    """Padded positives per direction; ``files`` = (texts file, images file) for error messages."""
    image_index = {im.image_id: i for i, im in enumerate(images)}
    text_index = {t.query_id: i for i, t in enumerate(texts)}
    t2i = _relevant_pairs([(t.query_id, t.image_ids) for t in texts], text_index, image_index, files, "image")
    i2t = _relevant_pairs(
        [(i.image_id, i.query_ids) for i in images], image_index, text_index, files[::-1], "query"
    )
    return {
        "text_to_image": positives_from_pairs(*t2i.unbind(1), len(texts)),
        "image_to_text": positives_from_pairs(*i2t.unbind(1), len(images)),
    }


# ---------------------------------------------------------------------------------------------
# features from a model


def entity_texts(
    caption: str,
    entities: list[str],
    max_entities: int,
    max_words: int | None,
    ignore_case: bool = True,
    encode_empty_slots: bool = False,
) -> tuple[list[str], list[str]]:
    """(prompts, masked captions) of a caption's first ``max_entities`` entities of at most
    ``max_words`` words (None: any length, as the release at test time); see ``slot_texts``."""
    from agree.data.datasets import slot_texts

    kept = [e for e in entities if max_words is None or len(e.split(" ")) <= max_words]
    return slot_texts(caption, kept, max_entities, ignore_case, encode_empty_slots)


def release_slots(texts: list[TestText], segs: dict[str, list[str]], max_entities: int) -> torch.Tensor:
    """[T, max_entities] bool: the release's feature files hold 10 vectors per query, of which the
    first ``min(len(items), 10)`` are real and the rest are the features of ``""``."""
    counts = torch.tensor([min(len(segs.get(t.query_id, [])), max_entities) for t in texts])
    return torch.arange(max_entities)[None, :] < counts[:, None]


def _extractors(cfg: DictConfig, model, tokenizer, device: torch.device):
    """(encode an image dataset, encode a list of texts): in this process, or in ``cfg.devices``
    processes through Lightning's predict loop under DDP (every process gets all features)."""
    from agree.model.clip import encode_image, encode_text

    if cfg.devices > 1:
        from agree.retrieval.predict import predict_features

        trainer = {
            "accelerator": "gpu" if device.type == "cuda" else "cpu",
            "devices": cfg.devices,
            "strategy": "ddp",
            "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
        }
        workers = cfg.data.num_workers

        def images(dataset, desc: str) -> torch.Tensor:
            return predict_features(model, encode_image, dataset, cfg.batch_size, trainer, workers)

        def texts(strings: list[str], desc: str) -> torch.Tensor:
            return predict_features(model, encode_text, tokenizer(strings), cfg.batch_size, trainer)

        return images, texts

    def images(dataset, desc: str) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            num_workers=cfg.data.num_workers,  # npz reads overlap the encoder
            pin_memory=device.type == "cuda",
        )
        return extract(lambda x: encode_image(model, x), loader, device, desc, len(loader))

    def texts(strings: list[str], desc: str) -> torch.Tensor:
        size = cfg.batch_size
        batches = [tokenizer(strings[i : i + size]) for i in range(0, len(strings), size)]
        return extract(lambda x: encode_text(model, x), batches, device, desc, len(batches))

    return images, texts


def model_features(
    cfg: DictConfig, texts: list[TestText], images: list[TestImage], segs: dict | None, layout
):
    """(text features, image features, entity features or None) from the configured model."""
    import lightning as L

    from agree.data.datasets import ImageArrays
    from agree.model.clip import create_clip, get_tokenizer

    L.seed_everything(cfg.seed, verbose=False)  # random-init weights
    device = resolve_device(cfg.device)
    npz = NpzImages(layout.images_npz("test"), layout.image_size)
    image_ids = [im.image_id for im in images]
    npz.require(image_ids, "test image_id")
    pretrained = str(resolve_path(cfg.ckpt_path)) if cfg.ckpt_path else cfg.model.pretrained
    model = create_clip(cfg.model.name, pretrained).to(device).eval()
    encode_images, encode_texts = _extractors(
        cfg, model, get_tokenizer(cfg.model.name, cfg.text.eot_on_truncation), device
    )
    image_features = encode_images(ImageArrays(npz, image_ids, "test image_id"), "images")
    text_features = encode_texts([t.text for t in texts], "texts")
    if segs is None:
        return text_features, image_features, None
    e = cfg.rerank
    per_query = [
        entity_texts(
            t.text,
            segs.get(t.query_id, []),
            e.max_entities,
            e.max_entity_words,
            cfg.text.mask_ignore_case,
            cfg.text.encode_empty_slots,
        )
        for t in texts
    ]
    valid = torch.zeros(len(texts), e.max_entities, dtype=torch.bool)
    for i, (prompts, _) in enumerate(per_query):
        valid[i, : len(prompts)] = True
    slots = []
    for which, desc in ((0, "entity prompts"), (1, "masked captions")):
        flat = [text for query in per_query for text in query[which]]  # only real slots are encoded
        encoded = encode_texts(flat, desc)
        slots.append(
            encoded.new_zeros(*valid.shape, text_features.shape[1]).masked_scatter(valid[..., None], encoded)
        )
    return text_features, image_features, EntityFeatures(slots[0], slots[1], valid)


# ---------------------------------------------------------------------------------------------
# features from reference JSONL files


def _in_order(ids: list[str], wanted: list[str], path, what: str) -> np.ndarray:
    """Row indices of ``wanted`` ids in ``ids``; every annotated id must have a feature."""
    index = {key: i for i, key in enumerate(ids)}
    missing = [key for key in wanted if key not in index]
    if missing:
        raise DataFormatError(
            f"{path}: no feature for {what} {missing[0]} ({len(missing)} of {len(wanted)} missing)"
        )
    return np.array([index[key] for key in wanted], dtype=np.int64)


def jsonl_features(
    cfg: DictConfig, texts: list[TestText], images: list[TestImage], segs: dict[str, list[str]] | None = None
):
    """(text features, image features, entity features or None) from reference JSONL files.

    With ``segs`` (``features.mask_padding``), only each query's real entity slots count in EGR.
    """
    f = cfg.features
    image_ids, image_rows = read_feature_jsonl(resolve_path(f.image_jsonl), "image_id")
    text_ids, text_rows = read_feature_jsonl(resolve_path(f.text_jsonl), "query_id")
    if image_rows.shape[1] != text_rows.shape[1]:
        raise DataFormatError(
            f"{f.image_jsonl}: {image_rows.shape[1]}-d features but {f.text_jsonl} has {text_rows.shape[1]}-d"
        )
    query_ids = [t.query_id for t in texts]
    image_rows = image_rows[_in_order(image_ids, [im.image_id for im in images], f.image_jsonl, "image")]
    text_rows = text_rows[_in_order(text_ids, query_ids, f.text_jsonl, "query")]
    entities = None
    if "egr" in cfg.rerank.stages:
        slots = []
        for key in ("prompt_jsonl", "mask_jsonl"):
            ids, rows, valid = read_entity_feature_jsonl(resolve_path(f[key]), cfg.rerank.max_entities)
            if rows.shape[2] not in (0, text_rows.shape[1]):
                raise DataFormatError(
                    f"{f[key]}: {rows.shape[2]}-d features but {f.text_jsonl} has {text_rows.shape[1]}-d"
                )
            order = _in_order(ids, query_ids, f[key], "query")
            rows = (
                rows[order]
                if rows.shape[2]
                else np.zeros((len(order), rows.shape[1], text_rows.shape[1]), np.float32)
            )
            slots.append((torch.from_numpy(rows), torch.from_numpy(valid[order])))
        if not torch.equal(slots[0][1].sum(1), slots[1][1].sum(1)):
            raise DataFormatError(
                f"{f.prompt_jsonl} and {f.mask_jsonl} list different numbers of entities per query"
            )
        valid = slots[0][1]
        if segs is not None:
            valid = valid & release_slots(texts, segs, cfg.rerank.max_entities)
        entities = EntityFeatures(slots[0][0], slots[1][0], valid)
    return torch.from_numpy(text_rows), torch.from_numpy(image_rows), entities


# ---------------------------------------------------------------------------------------------


def check_config(cfg: DictConfig) -> EvaluateSettings:
    """Incompatible or missing settings fail before any work, naming the key (``agree.settings``)."""
    return evaluate_settings(cfg)


def report_inputs(texts_file: Path, images_file: Path, layout: ReleaseLayout | None) -> dict:
    """Where ``agree.report`` finds the ground truth and the test images (absolute paths; no npz: None)."""
    npz = layout.images_npz("test") if layout is not None else None
    return {
        "texts": str(texts_file),
        "images": str(images_file),
        "images_npz": str(npz) if npz is not None and npz.is_file() else None,
        "image_size": layout.image_size if layout is not None else None,
        "mean": list(layout.mean) if layout is not None else None,
        "std": list(layout.std) if layout is not None else None,
    }


def load_test_set(cfg: DictConfig, settings: EvaluateSettings | None = None) -> TestSet:
    """Annotations, ground-truth checks, and features (from a model or from JSONL files)."""
    settings = settings or check_config(cfg)
    from_files = settings.from_files
    a = cfg.annotations
    layout = None if settings.layout is None else ensure_data(settings.cfg.data)
    texts_file = resolve_path(a.texts) if a.texts else layout.test_texts
    images_file = resolve_path(a.images) if a.images else layout.test_images
    texts, images = read_test_texts(texts_file), read_test_images(images_file)
    positives = ground_truth(texts, images, (texts_file, images_file))  # fails early on inconsistent ids
    inputs = report_inputs(texts_file, images_file, layout)
    segs = None
    if "egr" in cfg.rerank.stages and (not from_files or cfg.features.mask_padding):
        segs = read_text_segs(resolve_path(a.text_segs) if a.text_segs else layout.test_text_segs)
    if from_files:
        features = jsonl_features(cfg, texts, images, segs)
        return TestSet(texts, images, positives, *features, report_inputs=inputs)
    features = model_features(cfg, texts, images, segs, layout)
    return TestSet(texts, images, positives, *features, report_inputs=inputs)


def evaluate(cfg: DictConfig) -> dict:
    """Extract (or read) features, rank and re-rank both directions, score, write every output."""
    settings = check_config(cfg)
    target = settings.output_dir
    check_entries(target, "evaluate", OUTPUTS)  # before any work: never replace a user's features/ ...
    data = load_test_set(cfg, settings)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return {}  # extraction over several processes: the first one ranks and writes
    device, r = settings.device, settings.rerank
    entities = data.entities
    if entities is not None:
        entities = EntityFeatures(
            entities.prompts.to(device), entities.masks.to(device), entities.valid.to(device)
        )
    lists = rank_stages(
        data.text_features.to(device),
        data.image_features.to(device),
        r["stages"],
        r["k"],
        entities,
        depth=r["depth"],
        absent_rank=r["absent_rank"],
        text_to_image=r["text_to_image"],
        image_to_text=r["image_to_text"],
    )
    results = {
        stage: summarise(*(recall_at_k(ranked[d].cpu(), data.positives[d]) for d in DIRECTIONS))
        for stage, ranked in lists.items()
    }

    claim_entries(target, "evaluate", OUTPUTS)
    out = staging_dir(target, "evaluate")  # the outputs replace an earlier evaluation's as a set
    query_ids = [t.query_id for t in data.texts]
    image_ids = [im.image_id for im in data.images]
    save_features(out / "features", "images", image_ids, data.image_features)
    save_features(out / "features", "texts", query_ids, data.text_features)
    if data.entities is not None:
        save_features(out / "features", "entity_prompts", query_ids, data.entities.prompts)
        save_features(out / "features", "entity_masks", query_ids, data.entities.masks)
        save_features(out / "features", "entity_valid", query_ids, data.entities.valid.float())
    names = {
        "text_to_image": (query_ids, image_ids, "query_id"),
        "image_to_text": (image_ids, query_ids, "image_id"),
    }
    for stage, ranked in lists.items():
        for direction in DIRECTIONS:
            queries, items, id_key = names[direction]
            rows = [[items[i] for i in row if i >= 0] for row in ranked[direction].tolist()]
            write_jsonl(
                out / "predictions" / f"{stage}_{direction}.jsonl", prediction_rows(id_key, queries, rows)
            )
            write_json(
                out / "evaluation" / f"{stage}_{direction}.json", evaluation_json(results[stage][direction])
            )
    write_json(out / "report_inputs.json", data.report_inputs)
    write_json(out / "results.json", results)
    replace_as_set(out, target, OUTPUTS, last="results.json")
    return results


def format_table(results: dict) -> str:
    """A plain-text recall table: one row per stage and direction."""
    lines = [f"{'stage':<13}{'direction':<15}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mR':>7}{'RSUM':>8}"]
    for stage, block in results.items():
        for direction in DIRECTIONS:
            r = block[direction]
            lines.append(
                f"{stage:<13}{direction:<15}{r['r1']:>7.1f}{r['r5']:>7.1f}{r['r10']:>7.1f}"
                f"{r['mean_recall']:>7.1f}{block['rsum']:>8.1f}"
            )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        results = evaluate(cfg)
    if not results:  # another process of a multi-process extraction
        return None
    print(format_table(results))
    print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return results[list(results)[-1]]["rsum"]


if __name__ == "__main__":
    main()
