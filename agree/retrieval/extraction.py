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
from agree.data.feature_cache import FeatureCache
from agree.data.feature_files import entity_slots
from agree.data.layout import resolve_path
from agree.data.npz_images import NpzImages
from agree.data.records import TestImage, TestText
from agree.data.swaps import draw_swaps
from agree.errors import DataFormatError
from agree.retrieval.entity_rows import listing_order, match_rows
from agree.retrieval.features import extract, lightning_precision
from agree.retrieval.pipeline import EntityFeatures, RankInputs
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


def _predicted(cfg: DictConfig, model, tokenizer, device: torch.device, passes: dict) -> dict:
    """The features of each pass (name -> an image dataset or a list of texts) from ``cfg.devices``
    processes, in one run of Lightning's predict loop under DDP (every process gets all features).
    Lightning puts each process's model on its own device: the model here is still on the CPU."""
    from agree.model.clip import encode_image, encode_text
    from agree.retrieval.predict import predict_features

    trainer = {
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "devices": cfg.devices,
        "strategy": "ddp",
        "precision": lightning_precision(device, cfg.features.precision),
    }
    jobs = [
        (encode_text, tokenizer(data), 0)
        if isinstance(data, list)
        else (encode_image, data, cfg.data.num_workers)
        for data in passes.values()
    ]
    return dict(zip(passes, predict_features(model, jobs, cfg.batch_size, trainer), strict=True))


def _extractors(cfg: DictConfig, model, tokenizer, device: torch.device):
    """(encode an image dataset, encode a list of texts) in this process, on ``device``."""
    from agree.model.clip import encode_image, encode_text

    def images(dataset, desc: str) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            num_workers=cfg.data.num_workers,  # npz reads overlap the encoder
            pin_memory=device.type == "cuda",
        )
        return extract(
            lambda x: encode_image(model, x), loader, device, desc, len(loader), cfg.features.precision
        )

    def texts(strings: list[str], desc: str) -> torch.Tensor:
        size = cfg.batch_size
        starts = range(0, len(strings), size)
        # tokenised lazily: extract() reads the next batch while the encoder runs on this one
        batches = (tokenizer(strings[i : i + size]) for i in starts)
        return extract(
            lambda x: encode_text(model, x), batches, device, desc, len(starts), cfg.features.precision
        )

    return images, texts


def model_features(
    cfg: DictConfig,
    texts: list[TestText],
    images: list[TestImage],
    entity_rows: list[tuple[str, list[str]]] | None,
    layout,
    pretrained: str | None,
    device: torch.device,
    probe_segs: dict[str, list[str]] | None = None,
):
    """(text features, image features, entity features of ``entity_rows`` or None, swap features
    or None) from ``cfg.model.name`` with the weights ``pretrained`` (a tag, a file or a checkpoint;
    None: random) on ``device`` (under DDP, ``cfg.devices`` processes, each on its own device).
    ``entity_rows``: (caption, entities) of each row of entity features; ``probe_segs``: the test
    entities of each query, whose swapped captions (the binding probe) are encoded too."""
    import lightning as L

    from agree.data.datasets import ImageArrays
    from agree.model.clip import create_clip
    from agree.model.tokenizer import get_tokenizer

    L.seed_everything(cfg.seed, verbose=False)  # random-init weights
    npz = NpzImages(layout.images_npz("test"), layout.image_size)
    image_ids = [im.image_id for im in images]
    npz.require(image_ids, "test image_id")
    model = create_clip(cfg.model.name, pretrained).eval()
    tokenizer = get_tokenizer(cfg.model.name, cfg.text.eot_on_truncation)
    passes = {"images": ImageArrays(npz, image_ids, "test image_id"), "texts": [t.text for t in texts]}
    if entity_rows is not None:
        e = cfg.rerank
        per_query = [
            entity_texts(
                caption,
                entities,
                e.max_entities,
                e.max_entity_words,
                cfg.text.mask_ignore_case,
                cfg.text.encode_empty_slots,
            )
            for caption, entities in entity_rows
        ]
        valid = slot_mask([len(prompts) for prompts, _ in per_query], e.max_entities)
        for which, desc in ((0, "entity prompts"), (1, "masked captions")):
            passes[desc] = [text for query in per_query for text in query[which]]  # only real slots
    swap_rows, swapped = swapped_captions(cfg, texts, probe_segs) if probe_segs is not None else ([], [])
    if swap_rows:
        passes["swapped captions"] = swapped
    if cfg.devices > 1:
        features = _predicted(cfg, model, tokenizer, device, passes)
    else:
        model = model.to(device)
        encode_images, encode_texts = _extractors(cfg, model, tokenizer, device)
        features = {
            desc: encode_texts(data, desc) if isinstance(data, list) else encode_images(data, desc)
            for desc, data in passes.items()
        }
    swaps = SwapFeatures(features["swapped captions"], torch.tensor(swap_rows)) if swap_rows else None
    if entity_rows is None:
        return features["texts"], features["images"], None, swaps
    prompts, masks = (scatter_slots(features[desc], valid) for desc in ("entity prompts", "masked captions"))
    return features["texts"], features["images"], EntityFeatures(prompts, masks, valid), swaps


def swapped_captions(cfg: DictConfig, texts: list[TestText], segs: dict) -> tuple[list[int], list[str]]:
    """(rows, swapped captions) of the test captions that have a swap (``draw_swaps`` with
    ``cfg.seed``) over their test entities (the first ``rerank.max_entities`` of at most
    ``rerank.max_entity_words`` words)."""
    e = cfg.rerank
    entities = [kept_entities(segs.get(t.query_id, []), e.max_entity_words, e.max_entities) for t in texts]
    swaps = draw_swaps([t.text for t in texts], entities, cfg.seed)
    rows = [i for i, swap in enumerate(swaps) if swap is not None]
    return rows, [swaps[i] for i in rows]


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
    cfg: DictConfig,
    texts: list[TestText],
    images: list[TestImage],
    segs: dict[str, list[str]] | None = None,
    cache: FeatureCache | None = None,
) -> RankInputs:
    """Features from reference JSONL files, rows in annotation order, each file parsed once
    through ``cache`` (default: none, every file parsed).

    With ``segs`` (``features.mask_padding``), only the first ``len(items)`` entity vectors of each
    line count in EGR. ``features.caption_entities`` and ``features.gallery_order`` line the rows up
    as the release does (``agree.retrieval.entity_rows``).
    """
    f, cache = cfg.features, cache or FeatureCache(None)
    image_ids, image_rows = cache.vectors(resolve_path(f.image_jsonl), "image_id")
    text_ids, text_rows = cache.vectors(resolve_path(f.text_jsonl), "query_id")
    if image_rows.shape[1] != text_rows.shape[1]:
        raise DataFormatError(
            f"{f.image_jsonl}: {image_rows.shape[1]}-d features but {f.text_jsonl} has {text_rows.shape[1]}-d"
        )
    query_ids = [t.query_id for t in texts]
    image_at = _in_order(image_ids, [im.image_id for im in images], f.image_jsonl, "image")
    text_at = _in_order(text_ids, query_ids, f.text_jsonl, "query")
    in_files = f.gallery_order == "files"
    inputs = RankInputs(
        torch.from_numpy(text_rows[text_at]),
        torch.from_numpy(image_rows[image_at]),
        text_order=listing_order(text_at) if in_files else None,
        image_order=listing_order(image_at) if in_files else None,
    )
    if "egr" not in cfg.rerank.stages:
        return inputs
    # a caption as an image->text candidate: its own row, or the row at its position in text_jsonl
    positions = None
    if f.caption_entities == "by_position":
        positions = np.arange(len(query_ids)) if isinstance(text_at, slice) else text_at
    per_file = []
    for key in ("prompt_jsonl", "mask_jsonl"):
        rows = cache.entities(resolve_path(f[key]))
        ids, (slot_rows, valid) = rows.ids, entity_slots(rows, cfg.rerank.max_entities)
        if slot_rows.shape[2] not in (0, text_rows.shape[1]):
            raise DataFormatError(
                f"{f[key]}: {slot_rows.shape[2]}-d features but {f.text_jsonl} has {text_rows.shape[1]}-d"
            )
        if not slot_rows.shape[2]:
            slot_rows = np.zeros((len(ids), slot_rows.shape[1], text_rows.shape[1]), np.float32)
        if segs is not None:
            valid = valid & slot_mask([len(segs.get(i, [])) for i in ids], cfg.rerank.max_entities).numpy()
        at = _in_order(ids, query_ids, f[key], "query")
        chosen = [(torch.from_numpy(slot_rows[at]), torch.from_numpy(valid[at]))]
        if positions is not None:
            row = match_rows(ids, query_ids, positions, f[key])[1]
            same = np.array_equal(np.arange(len(ids))[at], row)
            chosen.append(
                chosen[0] if same else (torch.from_numpy(slot_rows[row]), torch.from_numpy(valid[row]))
            )
        per_file.append(chosen)
    (prompts, valid), (masks, mask_valid) = per_file[0][0], per_file[1][0]
    if not torch.equal(valid.sum(1), mask_valid.sum(1)):
        raise DataFormatError(
            f"{f.prompt_jsonl} and {f.mask_jsonl} list different numbers of entities per query"
        )
    inputs.entities = EntityFeatures(prompts, masks, valid)
    if positions is not None and any(chosen[1] is not chosen[0] for chosen in per_file):
        (prompts, valid), (masks, _) = per_file[0][1], per_file[1][1]
        inputs.caption_entities = EntityFeatures(prompts, masks, valid)
    return inputs
