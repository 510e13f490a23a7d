"""Test-split features for an evaluation: from a model (in this process or several under DDP) or
from the release's JSONL feature files, with each query's entity slots (prompts, masked captions)
and, from a model, the swapped captions of the binding probe.

Model, dataset and Lightning code is imported inside the functions that use it, so that an
evaluation from feature files loads none of it.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from agree.data.entities import kept_entities, scatter_slots, slot_mask
from agree.data.feature_files import feature_rows, read_entity_feature_jsonl, read_feature_jsonl
from agree.data.layout import resolve_path
from agree.data.npz_images import NpzImages
from agree.data.records import TestImage, TestText
from agree.data.swaps import draw_swaps
from agree.errors import DataFormatError
from agree.retrieval.features import extract
from agree.retrieval.pipeline import EntityFeatures
from agree.retrieval.probe import SwapFeatures


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

    return slot_texts(
        caption, kept_entities(entities, max_words), max_entities, ignore_case, encode_empty_slots
    )


def release_slots(texts: list[TestText], segs: dict[str, list[str]], max_entities: int) -> torch.Tensor:
    """[T, max_entities] bool: the release's feature files hold 10 vectors per query, of which the
    first ``min(len(items), 10)`` are real and the rest are the features of ``""``."""
    return slot_mask([len(segs.get(t.query_id, [])) for t in texts], max_entities)


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
        starts = range(0, len(strings), size)
        # tokenised lazily: extract() reads the next batch while the encoder runs on this one
        batches = (tokenizer(strings[i : i + size]) for i in starts)
        return extract(lambda x: encode_text(model, x), batches, device, desc, len(starts))

    return images, texts


def model_features(
    cfg: DictConfig,
    texts: list[TestText],
    images: list[TestImage],
    segs: dict | None,
    layout,
    pretrained: str | None,
    device: torch.device,
    entity_slots: bool = True,
    probe: bool = False,
):
    """(text features, image features, entity features or None, swap features or None) from
    ``cfg.model.name`` with the weights ``pretrained`` (a tag, a file or a checkpoint; None:
    random) on ``device``. With ``segs``, the entity slots (``entity_slots``, for EGR) and the
    swapped captions of the binding probe (``probe``) are encoded too."""
    import lightning as L

    from agree.data.datasets import ImageArrays
    from agree.model.clip import create_clip
    from agree.model.tokenizer import get_tokenizer

    L.seed_everything(cfg.seed, verbose=False)  # random-init weights
    npz = NpzImages(layout.images_npz("test"), layout.image_size)
    image_ids = [im.image_id for im in images]
    npz.require(image_ids, "test image_id")
    model = create_clip(cfg.model.name, pretrained).to(device).eval()
    encode_images, encode_texts = _extractors(
        cfg, model, get_tokenizer(cfg.model.name, cfg.text.eot_on_truncation), device
    )
    image_features = encode_images(ImageArrays(npz, image_ids, "test image_id"), "images")
    text_features = encode_texts([t.text for t in texts], "texts")
    swaps = probe_swaps(cfg, texts, segs, encode_texts) if probe and segs is not None else None
    if segs is None or not entity_slots:
        return text_features, image_features, None, swaps
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
    valid = slot_mask([len(prompts) for prompts, _ in per_query], e.max_entities)
    slots = []
    for which, desc in ((0, "entity prompts"), (1, "masked captions")):
        flat = [text for query in per_query for text in query[which]]  # only real slots are encoded
        slots.append(scatter_slots(encode_texts(flat, desc), valid))
    return text_features, image_features, EntityFeatures(slots[0], slots[1], valid), swaps


def probe_swaps(cfg: DictConfig, texts: list[TestText], segs: dict, encode_texts) -> SwapFeatures | None:
    """The features of each test caption's swap (``draw_swaps`` with ``cfg.seed``) over its test
    entities (the first ``rerank.max_entities`` of at most ``rerank.max_entity_words`` words);
    None when no caption has two."""
    e = cfg.rerank
    entities = [kept_entities(segs.get(t.query_id, []), e.max_entity_words, e.max_entities) for t in texts]
    swaps = draw_swaps([t.text for t in texts], entities, cfg.seed)
    rows = [i for i, swap in enumerate(swaps) if swap is not None]
    if not rows:
        return None
    return SwapFeatures(encode_texts([swaps[i] for i in rows], "swapped captions"), torch.tensor(rows))


def _in_order(ids: list[str], wanted: list[str], path, what: str) -> np.ndarray | slice:
    """Row indices of ``wanted`` ids in ``ids`` (every annotated id must have a feature); all rows,
    as a slice that copies nothing, when the file lists exactly ``wanted`` in that order."""
    if ids == wanted:
        return slice(None)
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
    keys = {"image_jsonl": "image_id", "text_jsonl": "query_id"}
    if "egr" in cfg.rerank.stages:
        keys.update(prompt_jsonl="query_id", mask_jsonl="query_id")
    # every file's parsing starts now: the workers go on with the next while one is assembled here
    paths = {key: resolve_path(f[key]) for key in keys}
    rows = {key: feature_rows(paths[key], id_key) for key, id_key in keys.items()}
    image_ids, image_rows = read_feature_jsonl(paths["image_jsonl"], "image_id", rows["image_jsonl"])
    text_ids, text_rows = read_feature_jsonl(paths["text_jsonl"], "query_id", rows["text_jsonl"])
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
            ids, slot_rows, valid = read_entity_feature_jsonl(paths[key], cfg.rerank.max_entities, rows[key])
            if slot_rows.shape[2] not in (0, text_rows.shape[1]):
                raise DataFormatError(
                    f"{f[key]}: {slot_rows.shape[2]}-d features but {f.text_jsonl} has {text_rows.shape[1]}-d"
                )
            order = _in_order(ids, query_ids, f[key], "query")
            slot_rows = (
                slot_rows[order]
                if slot_rows.shape[2]
                else np.zeros((len(query_ids), slot_rows.shape[1], text_rows.shape[1]), np.float32)
            )
            slots.append((torch.from_numpy(slot_rows), torch.from_numpy(valid[order])))
        if not torch.equal(slots[0][1].sum(1), slots[1][1].sum(1)):
            raise DataFormatError(
                f"{f.prompt_jsonl} and {f.mask_jsonl} list different numbers of entities per query"
            )
        valid = slots[0][1]
        if segs is not None:
            valid = valid & release_slots(texts, segs, cfg.rerank.max_entities)
        entities = EntityFeatures(slots[0][0], slots[1][0], valid)
    return torch.from_numpy(text_rows), torch.from_numpy(image_rows), entities
