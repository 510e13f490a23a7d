"""Evaluate image-text retrieval on the test split, with optional re-ranking.

    python -m agree.evaluate ckpt_path=outputs/train/.../checkpoints/last.ckpt [rerank=egr_tbr]

Features come from a model (a checkpoint or ``model.pretrained``) or from reference JSONL
feature files (``features.*``). Writes under ``output_dir``: ``features/`` (binary feature
store), ``predictions/`` (reference JSONL per stage and direction), ``evaluation/`` (reference
evaluation JSON per stage and direction), ``results.json`` and ``report_inputs.json`` (where
``agree.report`` finds the annotations and test images). They are written into a hidden staging
folder first and replace an earlier evaluation's outputs as a set (``agree.atomic.replace_as_set``).

Model, dataset and Lightning code is imported inside the functions that extract features, so an
evaluation from feature files starts without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from agree.atomic import replace_as_set, staging_dir, write_json, write_jsonl
from agree.checks import check_data_root, check_evaluate_config
from agree.cli import user_errors
from agree.config import ensure_data, resolve_device, resolve_path
from agree.data.evaluation_files import evaluation_json, prediction_rows
from agree.data.feature_files import read_entity_feature_jsonl, read_feature_jsonl, save_features
from agree.data.layout import ReleaseLayout
from agree.data.npz_images import NpzImages
from agree.data.records import TestImage, TestText, read_test_images, read_test_texts, read_text_segs
from agree.errors import ConfigError, DataFormatError
from agree.folders import check_entries, claim_entries
from agree.retrieval.features import extract
from agree.retrieval.ground_truth import ground_truth
from agree.retrieval.metrics import DIRECTIONS, recall_at_k, summarise
from agree.retrieval.pipeline import EntityFeatures, rank_stages

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


def check_config(cfg: DictConfig) -> None:
    """Incompatible or missing settings fail before any work, naming the key."""
    f = cfg.features
    if bool(f.image_jsonl) != bool(f.text_jsonl):
        raise ConfigError("features.image_jsonl and features.text_jsonl go together: give both or neither")
    if f.image_jsonl and "egr" in cfg.rerank.stages and not (f.prompt_jsonl and f.mask_jsonl):
        raise ConfigError(
            f"rerank={'+'.join(cfg.rerank.stages)} needs entity features: set features.prompt_jsonl and "
            "features.mask_jsonl, or extract them with a model (drop features.*)"
        )
    for key in ("image_jsonl", "text_jsonl", "prompt_jsonl", "mask_jsonl"):
        if f[key] and not resolve_path(f[key]).is_file():
            raise ConfigError(f"features.{key}={f[key]}: file not found")
    _check_entity_counts(cfg)
    if isinstance(cfg.devices, bool) or not isinstance(cfg.devices, int) or cfg.devices < 1:
        raise ConfigError(f"devices={cfg.devices}: the number of extraction processes, an integer >= 1")
    check_evaluate_config(cfg)


def _check_entity_counts(cfg: DictConfig) -> None:
    """``features.mask_padding`` on JSONL entity features needs each query's entity count (text_segs)."""
    f = cfg.features
    if not (f.image_jsonl and "egr" in cfg.rerank.stages and f.mask_padding) or cfg.annotations.text_segs:
        return
    uses_data_root = not (cfg.annotations.images and cfg.annotations.texts)
    layout = check_data_root(cfg.data) if uses_data_root else None
    if uses_data_root and (layout is None or layout.test_text_segs.is_file()):
        return  # generated data (which has its text_segs), or the file under data.root
    raise ConfigError(
        "features.mask_padding=true needs each query's entity count: set annotations.text_segs="
        "<flickr30k_test_texts_segs.jsonl>, or features.mask_padding=false (method=reference) to "
        "score all 10 vectors as the release does"
    )


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


def load_test_set(cfg: DictConfig) -> TestSet:
    """Annotations, ground-truth checks, and features (from a model or from JSONL files)."""
    check_config(cfg)
    from_files = bool(cfg.features.image_jsonl)
    a = cfg.annotations
    layout = None if from_files and a.images and a.texts else ensure_data(cfg.data)
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
    target = Path(cfg.output_dir)
    check_entries(target, "evaluate", OUTPUTS)  # before any work: never replace a user's features/ ...
    data = load_test_set(cfg)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return {}  # extraction over several processes: the first one ranks and writes
    device = resolve_device(cfg.device)
    r = cfg.rerank
    entities = data.entities
    if entities is not None:
        entities = EntityFeatures(
            entities.prompts.to(device), entities.masks.to(device), entities.valid.to(device)
        )
    lists = rank_stages(
        data.text_features.to(device),
        data.image_features.to(device),
        list(r.stages),
        r.k,
        entities,
        depth=r.get("depth", 128),
        absent_rank=r.get("absent_rank", 10000),
        text_to_image=OmegaConf.to_container(r.text_to_image) if "text_to_image" in r else None,
        image_to_text=OmegaConf.to_container(r.image_to_text) if "image_to_text" in r else None,
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
