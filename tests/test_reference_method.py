"""``method=reference`` against the release, one test per row of docs/reference-mode.md's table.

Each test runs our code under both methods (composed from the real configs) on the same small
inputs and compares with a transcription of the release's code written here (EasyNLP
examples/agree: training/data.py, training/train_all.py, training/main_all.py, eval/data.py,
eval/extract_features_zs_mask+prompt.py, eval/make_topk_predictions_mask+prompt.py,
eval/evaluation.py, clip/clip.py).
"""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf

from agree.config import resolve_precision
from agree.data.datamodule import AgreeDataModule
from agree.data.datasets import CollateTrain, random_square
from agree.data.npz_images import NpzImages
from agree.data.pixels import black
from agree.data.records import read_test_images, read_test_texts, read_text_segs
from agree.errors import ConfigError, DataFormatError
from agree.evaluate import evaluate, model_inputs
from agree.model.clip import create_clip, encode_image, encode_text
from agree.model.module import AgreeModule, agree_losses
from agree.model.registry import inputs_for
from agree.model.tokenizer import get_tokenizer
from agree.retrieval import extraction as extraction_module
from agree.retrieval import features as features_module
from agree.retrieval import predict as predict_module
from agree.retrieval import rerank
from agree.retrieval.extraction import entity_texts, model_features
from agree.retrieval.predict import predict_features
from agree.settings import device_batch_size
from agree.train import train

from .test_cli import SMALL, config

METHODS = ("agree", "reference")


def train_config(method, *overrides):
    return config("train", f"method={method}", "output_dir=x", *overrides)


# ---------------------------------------------------------------------------------------------
# the release's code, transcribed


def release_tokenize(tokenizer, texts, context_length=77):
    """clip/clip.py ``tokenize``: cut at the context length, no end token put back."""
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [tokenizer.sot_token_id] + tokenizer.encode(text) + [tokenizer.eot_token_id]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


def release_clip_loss(image, text, logit_scale):
    """train_all.py ``get_loss`` (one process): every other pair of the batch is a negative."""
    logits_per_image = logit_scale * image @ text.t()
    logits_per_text = logit_scale * text @ image.t()
    ground_truth = torch.arange(len(logits_per_image)).long()
    return (
        F.cross_entropy(logits_per_image, ground_truth) + F.cross_entropy(logits_per_text, ground_truth)
    ) / 2


def release_margin_loss(positive_logits, negative_logits, logit_scale):
    """train_all.py: the diagonal logits rebuilt with ``torch.tensor`` (no graph), then
    ``MarginRankingLoss(reduction="sum")`` divided by the logit scale."""
    n = len(positive_logits)
    gt = torch.tensor([positive_logits[i] for i in range(n)])
    neg = torch.tensor([negative_logits[i] for i in range(n)])
    return nn.MarginRankingLoss(reduction="sum")(gt, neg, torch.tensor([1] * n)) / logit_scale


def release_random_mask(img_array, x_start, y_start, size=224, side=32):
    """data.py ``_read_img_tensor_random_mask`` with its two ``random.randrange(224)`` draws given."""
    img_array = img_array.copy()
    for x in range(x_start, min(size, x_start + side)):
        for y in range(y_start, min(size, y_start + side)):
            img_array[0][x][y] = 0
            img_array[1][x][y] = 0
            img_array[2][x][y] = 0
    return img_array


def release_cosine_lr(base_lr, warmup_length, steps):
    """training/scheduler.py ``cosine_lr`` (open_clip's of the time; the release imports it but does
    not ship it, and the EasyNLP copy is not stored where we could read it)."""

    def _lr_adjuster(step):
        if step < warmup_length:
            return base_lr * (step + 1) / warmup_length
        e = step - warmup_length
        es = steps - warmup_length
        return 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr

    return _lr_adjuster


def release_decayed(named_parameters):
    """main_all.py: the parameter names AdamW decays."""
    exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    return {n for n, p in named_parameters if not exclude(n) and p.requires_grad}


def scores(vector, rows):
    """make_topk_predictions_mask+prompt.py's similarities: one row times a batch of rows."""
    return (torch.from_numpy(vector)[None] @ torch.from_numpy(rows).t()).tolist()[0]


def release_egr(texts, images, prompts, masks, slots=None, k=10, topk=128, batch=32):
    """make_topk_predictions_mask+prompt.py, both directions, on its files' lines: ``texts``,
    ``images``, ``prompts`` and ``masks`` are (ids, float32 array) in the lines' order ([N, D]; the
    entity files [N, 10, D]). Text->image looks a caption's entity lines up by its id, image->text
    takes the lines at the caption's position; every similarity is a [1, D] x [D, batch] float32
    product, the rest Python floats. ``slots``: {query id: entity vectors that count} (the
    release: all 10; image->text reads the count of the line at the caption's position).
    Returns {direction: {query id: ranked item ids}}, ids as integers."""
    (text_ids, text_rows), (image_ids, image_rows) = texts, images
    prompt_of, mask_of = dict(zip(*prompts, strict=True)), dict(zip(*masks, strict=True))
    slot_count = prompts[1].shape[1]
    # image->text: one array per slot over all lines, sliced by the caption batch
    prompt_slots = [np.ascontiguousarray(prompts[1][:, j]) for j in range(slot_count)]
    mask_slots = [np.ascontiguousarray(masks[1][:, j]) for j in range(slot_count)]

    def used(query_id):
        return slot_count if slots is None else slots[query_id]

    def mean(values):  # numpy's mean over the first axis: added in order, then divided
        return sum(values) / len(values) if values else 0.0

    def rank(tuples):
        top = sorted(tuples, key=lambda x: x[1], reverse=True)[:topk]
        first = sorted(top, key=lambda x: x[2], reverse=True)
        return [int(entry[0]) for entry in sorted(first, key=lambda x: x[3], reverse=True)[:k]]

    t2i = {}
    for query_id, text in zip(text_ids, text_rows, strict=True):
        n, tuples = used(query_id), []
        for start in range(0, len(image_ids), batch):
            rows = image_rows[start : start + batch]
            raw = scores(text, rows)
            masked = [scores(m, rows) for m in mask_of[query_id][:n]]
            prompted = [scores(p, rows) for p in prompt_of[query_id][:n]]
            for b, image_id in enumerate(image_ids[start : start + batch]):
                overall = 0.9 * raw[b] + 0.1 * sum(raw[b] - m[b] for m in masked)
                final = 0.99 * overall + 0.01 * mean([p[b] for p in prompted])
                tuples.append((image_id, raw[b], overall, final))
        t2i[int(query_id)] = rank(tuples)
    i2t = {}
    for image_id, image in zip(image_ids, image_rows, strict=True):
        tuples = []
        for start in range(0, len(text_ids), batch):
            raw = scores(image, text_rows[start : start + batch])
            masked = [scores(image, rows[start : start + batch]) for rows in mask_slots]
            prompted = [scores(image, rows[start : start + batch]) for rows in prompt_slots]
            for b, text_id in enumerate(text_ids[start : start + batch]):
                n = used(prompts[0][start + b])
                overall = 0.8 * raw[b] + 0.2 * mean([p[b] for p in prompted[:n]])
                penalty = sum(min(0, raw[b] - m[b]) for m in masked[:n])
                tuples.append((text_id, raw[b], overall, 0.98 * overall + 0.02 * penalty))
        i2t[int(image_id)] = rank(tuples)
    return {"text_to_image": t2i, "image_to_text": i2t}


def release_recalls(reference, predictions):
    """evaluation.py: hit counts over the ground truth's queries, times 100."""
    r1 = r5 = r10 = 0
    for qid, truth in reference.items():
        top = predictions[qid]
        r1 += any(i in top[:1] for i in truth)
        r5 += any(i in top[:5] for i in truth)
        r10 += any(i in top[:10] for i in truth)
    n = len(reference)
    return {"r1": r1 * 1.0 / n * 100, "r5": r5 * 1.0 / n * 100, "r10": r10 * 1.0 / n * 100}


# ---------------------------------------------------------------------------------------------
# rows 1 and 10: InfoNCE negatives, margin-loss gradients


@pytest.fixture(scope="module")
def tiny_batch():
    torch.manual_seed(0)
    model = create_clip("agree-tiny", None)
    tokenizer = get_tokenizer("agree-tiny")
    captions = ["a red circle", "a blue square", "a red circle", "two green men"]
    batch = {
        "images": torch.randn(4, 3, 64, 64),
        "captions": tokenizer(captions),
        "image_keys": torch.tensor([7, 8, 7, 9]),  # rows 0 and 2: two captions of one image
        "caption_keys": torch.tensor([1, 2, 1, 3]),
        "ground_masked_images": torch.randn(4, 3, 64, 64),
    }
    return model, batch


@pytest.mark.parametrize("method", METHODS)
def test_row1_other_positives_among_negatives(method, tiny_batch):
    model, batch = tiny_batch
    cfg = train_config(method)
    got = agree_losses(model, batch, {"clip": 1.0}, 0.0, cfg.loss_options.skip_duplicate_negatives)["clip"]
    with torch.no_grad():
        image, text = encode_image(model, batch["images"]), encode_text(model, batch["captions"])
        release = release_clip_loss(image, text, model.logit_scale.exp())
    if method == "reference":
        assert got.item() == pytest.approx(release.item(), rel=1e-6)
    else:  # the release's loss with the other positive of rows 0 and 2 taken out of the negatives
        logits = model.logit_scale.exp().detach() * image @ text.t()
        logits[0, 2] = logits[2, 0] = float("-inf")
        corrected = (
            F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))
        ) / 2
        assert got.item() == pytest.approx(corrected.item(), rel=1e-6)
        assert got.item() != pytest.approx(release.item(), rel=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_row10_margin_losses_gradient(method, tiny_batch):
    model, batch = tiny_batch
    cfg = train_config(method)
    model.zero_grad()
    got = agree_losses(
        model,
        batch,
        {"ground_mask": 1.0},
        cfg.loss_options.margin,
        cfg.loss_options.skip_duplicate_negatives,
        cfg.loss_options.margin_gradient,
    )["ground_mask"]
    got.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    scale = model.logit_scale.exp()
    with torch.no_grad():
        image, text = encode_image(model, batch["images"]), encode_text(model, batch["captions"])
        masked = encode_image(model, batch["ground_masked_images"])
    positive, negative = (scale * image @ text.t()).diagonal(), (scale * masked @ text.t()).diagonal()
    release = release_margin_loss(positive, negative, scale)
    release.backward()
    assert got.item() == pytest.approx(release.item(), rel=1e-5) and release.item() > 0
    towers = [n for n in ours if n != "logit_scale" and ours[n].abs().sum() > 0]
    if method == "reference":  # only the division by the logit scale has a gradient, as in the release
        assert not towers
        assert ours["logit_scale"].item() == pytest.approx(model.logit_scale.grad.item(), rel=1e-5)
    else:
        assert towers


@pytest.mark.parametrize("method", METHODS)
def test_vg_losses_against_the_release(method, tiny_batch):
    """train_all.py's ``da_total_loss`` (vg_contrast: Visual Genome images against their entity
    prompts, InfoNCE) and ``da_mask_loss`` (vg_mask: s(vg, prompt) must beat s(vg_masked, prompt))."""
    model, batch = tiny_batch
    cfg = train_config(method)
    tokenizer = get_tokenizer("agree-tiny")
    torch.manual_seed(2)
    words = ("a dog", "a tree", "a car", "a hat")  # other texts than the batch's captions
    vg_batch = {
        **batch,
        "vg_images": torch.randn(4, 3, 64, 64),
        "vg_masked_images": torch.randn(4, 3, 64, 64),
        "vg_prompts": tokenizer([f"a photo containing {w}" for w in words]),
        "vg_keys": torch.arange(4),
    }
    options = cfg.loss_options
    weights = {"vg_contrast": 1.0, "vg_mask": 1.0}
    got = agree_losses(
        model, vg_batch, weights, options.margin, options.skip_duplicate_negatives, options.margin_gradient
    )
    scale = model.logit_scale.exp()
    with torch.no_grad():
        vg, masked = (
            encode_image(model, vg_batch["vg_images"]),
            encode_image(model, vg_batch["vg_masked_images"]),
        )
        prompts = encode_text(model, vg_batch["vg_prompts"])
    assert got["vg_contrast"].item() == pytest.approx(release_clip_loss(vg, prompts, scale).item(), rel=1e-5)
    positive, negative = (scale * vg @ prompts.t()).diagonal(), (scale * masked @ prompts.t()).diagonal()
    release, swapped = (
        release_margin_loss(positive, negative, scale),
        release_margin_loss(negative, positive, scale),
    )
    assert release.item() > 0 and release.item() != pytest.approx(swapped.item(), rel=1e-3)
    assert got["vg_mask"].item() == pytest.approx(release.item(), rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_empty_entity_slots_in_training_losses(method, tiny_batch):
    model, _ = tiny_batch
    cfg = train_config(method)
    tokenizer = get_tokenizer("agree-tiny")
    options = (cfg.text.mask_ignore_case, cfg.text.encode_empty_slots)
    collate = CollateTrain(tokenizer, frozenset({"prompts", "masked_captions"}), 5, *options)
    captions = ["a red circle left of a blue square", "two men on a bench", "a dog"]
    entities = [["a red circle", "a blue square"], ["two men"], ["a dog"]]
    torch.manual_seed(1)
    items = [
        {"image": torch.randn(3, 64, 64), "caption": c, "image_key": i, "entities": e}
        for i, (c, e) in enumerate(zip(captions, entities, strict=True))
    ]
    batch = collate(items)
    got = agree_losses(
        model, batch, {"prompt": 1.0, "text_mask": 1.0}, 0.0, cfg.loss_options.skip_duplicate_negatives
    )
    scale = model.logit_scale.exp().detach()
    with torch.no_grad():
        image, text = encode_image(model, batch["images"]), encode_text(model, batch["captions"])
        positive = (scale * image @ text.t()).diagonal()
        slots = []
        for j in range(5):  # data.py pads the prompts and masked captions of every caption to 5 with ""
            rows = [i for i, e in enumerate(entities) if j < len(e)]
            prompts = [f"a photo containing {e[j]}" if j < len(e) else "" for e in entities]
            masked = [
                c.replace(e[j], "[MASK]") if j < len(e) else ""
                for c, e in zip(captions, entities, strict=True)
            ]
            p, m = encode_text(model, tokenizer(prompts)), encode_text(model, tokenizer(masked))
            slots.append((rows, p, (scale * image @ m.t()).diagonal()))
    if method == "reference":  # train_all.py: prompt loss averaged over the 5 slots, mask loss summed
        prompt = sum(release_clip_loss(image, p, scale) for _, p, _ in slots) / 5
        mask = sum(release_margin_loss(positive, negative, scale) for _, _, negative in slots)
    else:  # the same over the real slots only
        used = [(rows, p, negative) for rows, p, negative in slots if rows]
        prompt = sum(release_clip_loss(image[rows], p[rows], scale) for rows, p, _ in used) / len(used)
        mask = sum(release_margin_loss(positive[rows], negative[rows], scale) for rows, _, negative in used)
    assert got["prompt"].item() == pytest.approx(prompt.item(), rel=1e-5)
    assert got["text_mask"].item() == pytest.approx(mask.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_empty_entity_slots_in_zero_shot_features(method, scenes):
    cfg = config("evaluate", f"method={method}", "rerank=egr", f"data.root={scenes.root}", "device=cpu")
    texts, images = read_test_texts(scenes.test_texts), read_test_images(scenes.test_images)
    segs = read_text_segs(scenes.test_text_segs)
    rows = [(t.text, segs[t.query_id]) for t in texts]
    _, _, entities, _ = model_features(cfg, texts, images, rows, scenes, None, torch.device("cpu"))
    counts = torch.tensor([min(len(segs[t.query_id]), 10) for t in texts])
    assert (counts < 10).all()
    real = torch.arange(10)[None, :] < counts[:, None]
    if method == "reference":  # eval/data.py: 10 prompts per query, padding with "", all scored
        assert entities.valid.all()
        padding = entities.prompts[~real]
        assert torch.allclose(padding, padding[:1].expand_as(padding), atol=1e-6)  # the features of ""
        assert not torch.allclose(entities.prompts[real][:1], padding[:1], atol=1e-3)
    else:
        assert torch.equal(entities.valid, real) and not entities.prompts[~real].any()


# ---------------------------------------------------------------------------------------------
# rows 2 and 3: [MASK] replacement, entity filter at test time

CAPTION = "Four men on top of a tall structure. four men again."
SEGS = ["four men", "top of a tall structure", "a very long entity of more than seven words here"]


@pytest.mark.parametrize("method", METHODS)
def test_row2_mask_replacement(method):
    train_cfg, eval_cfg = train_config(method), config("evaluate", f"method={method}", "rerank=egr")
    tokenizer = get_tokenizer("agree-tiny")
    collate = CollateTrain(tokenizer, frozenset({"masked_captions"}), 5, train_cfg.text.mask_ignore_case)
    item = {"image": torch.zeros(3, 4, 4), "caption": CAPTION, "image_key": 0, "entities": SEGS[:2]}
    trained_on = collate([item])["masked_captions"]
    _, evaluated_on = entity_texts(CAPTION, SEGS, 10, None, eval_cfg.text.mask_ignore_case)
    release = [CAPTION.replace(seg, "[MASK]") for seg in SEGS]  # data.py and eval/data.py
    if method == "reference":
        assert evaluated_on == release and torch.equal(trained_on, tokenizer(release[:2]))
        assert release[0] == "Four men on top of a tall structure. [MASK] again."
    else:
        corrected = [re.sub(re.escape(seg), "[MASK]", CAPTION, flags=re.IGNORECASE) for seg in SEGS]
        assert evaluated_on == corrected and torch.equal(trained_on, tokenizer(corrected[:2]))
        assert corrected[0] == "[MASK] on top of a tall structure. [MASK] again."


@pytest.mark.parametrize("method", METHODS)
def test_row3_no_entity_filter_at_test_time(method):
    e = config("evaluate", f"method={method}", "rerank=egr").rerank
    items = SEGS + [f"thing {i}" for i in range(10)]  # 13 items, one of 10 words
    prompts, masks = entity_texts(CAPTION, items, e.max_entities, e.max_entity_words)
    release = [f"a photo containing {o}" for o in items][:10]  # eval/data.py: prompt.format(object=o)
    assert prompts == release and len(masks) == 10


# ---------------------------------------------------------------------------------------------
# row 4: padded slots of the release's entity feature files in EGR


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_release(folder, files, owner, counts, text_order=None, image_order=None):
    """Release-format files in ``folder``: the feature files, ``files`` = (texts, images, prompts,
    masks), each (ids, array) in its lines' order; the annotations, listing the captions in
    ``text_order`` and the images in ``image_order`` (default: the feature files' orders), with
    ``owner`` {query id: image id} and {query id: ``counts``} entities in text_segs."""
    texts, images, prompts, masks = files
    text_order = list(texts[0]) if text_order is None else text_order
    image_order = list(images[0]) if image_order is None else image_order
    paths = {
        name: write_jsonl(
            folder / f"{name}.jsonl", [{key: i, "feature": f.tolist()} for i, f in zip(*rows, strict=True)]
        )
        for name, key, rows in (
            ("texts", "query_id", texts),
            ("images", "image_id", images),
            ("prompts", "query_id", prompts),
            ("masks", "query_id", masks),
        )
    }
    captions = {i: [q for q in text_order if owner[q] == i] for i in image_order}
    annotations = {
        "test_texts": [
            {"query_id": q, "query_text": f"t{q}", "item_ids": [int(owner[q])]} for q in text_order
        ],
        "test_images": [{"image_id": int(i), "item_ids": captions[i]} for i in image_order],
        "segs": [
            {"query_id": q, "query_text": f"t{q}", "items": [f"e{j}" for j in range(counts[q])]}
            for q in text_order
        ],
    }
    paths.update({name: write_jsonl(folder / f"{name}.jsonl", rows) for name, rows in annotations.items()})
    truth = {
        "text_to_image": {q: [int(owner[q])] for q in text_order},
        "image_to_text": {int(i): captions[i] for i in image_order},
    }
    return paths, truth


def lines(ids, rows, order):
    """(ids, rows) with the lines in ``order`` (of ids)."""
    at = [list(ids).index(i) for i in order]
    return [ids[i] for i in at], rows[at]


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """Release-format features (10 entity vectors per query, padding = the features of "") and
    annotations for 12 images and 24 captions; entity counts 0..4 and 12 in text_segs."""
    folder = tmp_path_factory.mktemp("release")
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    images = unit(rng.normal(size=(12, 16)))
    owner = np.repeat(np.arange(12), 2)
    texts = unit(images[owner] + 1.3 * rng.normal(size=(24, 16)))
    counts = [q % 5 for q in range(23)] + [12]
    empty = unit(rng.normal(size=16))  # the features of ""
    prompts = np.repeat(empty[None, None], 24, 0).repeat(10, 1)
    masks = prompts.copy()
    for q, n in enumerate(counts):
        n = min(n, 10)
        prompts[q, :n] = unit(images[owner[q]] + 1.0 * rng.normal(size=(n, 16)))
        masks[q, :n] = unit(texts[q] + 0.8 * rng.normal(size=(n, 16)))
    image_ids = [str(1000 + i) for i in range(12)]
    query_ids = list(range(24))
    files = ((query_ids, texts), (image_ids, images), (query_ids, prompts), (query_ids, masks))
    owners = {q: image_ids[owner[q]] for q in query_ids}
    paths, truth = write_release(folder, files, owners, counts)
    return paths, files, counts, truth


def release_config(paths, out, *overrides):
    return config(
        "evaluate",
        f"output_dir={out}",
        "rerank=egr",
        "rerank.k=10",
        "model.name=no-model-needed",
        f"annotations.images={paths['test_images']}",
        f"annotations.texts={paths['test_texts']}",
        f"features.image_jsonl={paths['images']}",
        f"features.text_jsonl={paths['texts']}",
        f"features.prompt_jsonl={paths['prompts']}",
        f"features.mask_jsonl={paths['masks']}",
        *overrides,
    )


def written_lists(out, stage="egr"):
    """{direction: {query id: ranked item ids}} of an evaluation's prediction files, ids as integers."""
    lists = {}
    for direction, key in (("text_to_image", "query_id"), ("image_to_text", "image_id")):
        rows = map(json.loads, (out / "predictions" / f"{stage}_{direction}.jsonl").read_text().splitlines())
        lists[direction] = {int(r[key]): [int(i) for i in r["item_ids"]] for r in rows}
    return lists


def assert_recalls(results, truth, lists, stage="egr"):
    for direction in lists:
        recalls = release_recalls(truth[direction], lists[direction])
        for k in ("r1", "r5", "r10"):
            assert results[stage][direction][k] == pytest.approx(recalls[k], rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_row4_padded_entity_slots_of_release_feature_files(method, release_files, tmp_path):
    paths, files, counts, truth = release_files
    out = tmp_path / "out"
    results = evaluate(
        release_config(paths, out, f"method={method}", f"annotations.text_segs={paths['segs']}")
    )
    real = {q: min(n, 10) for q, n in enumerate(counts)}
    expected = release_egr(*files, None if method == "reference" else real)
    other = release_egr(*files, real if method == "reference" else None)
    assert expected != other  # padding changes the lists on these inputs
    assert written_lists(out) == expected
    assert_recalls(results, truth, expected)


def test_row4_corrected_method_needs_the_entity_counts(release_files, tmp_path):
    paths = release_files[0]
    with pytest.raises(ConfigError, match=r"annotations.text_segs=.*method=reference"):
        evaluate(release_config(paths, tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    evaluate(release_config(paths, tmp_path / "o", "method=reference"))  # the release needs none


# ---------------------------------------------------------------------------------------------
# rows 5, 7 and 8 from a real (tiny) training run per method


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "scenes"  # generated by the first run, read by the second


@pytest.fixture(scope="module", params=METHODS)
def trained(request, scenes_root, tmp_path_factory):
    method = request.param
    cfg = config(
        "train",
        "+experiment=demo",
        f"method={method}",
        f"output_dir={tmp_path_factory.mktemp('run')}",
        f"data.root={scenes_root}",
        *SMALL,
        "trainer.max_epochs=1",
        "optim.warmup_steps=2",  # short, so that a step of the cosine is reached
        "data.batch_size=32",
        "data.global_batch_size=null" if method == "agree" else "data.global_batch_size=32",
    )
    _, objects = train(cfg)
    return method, cfg, objects


def test_row5_learning_rate_schedule(trained):
    method, cfg, objects = trained
    trainer = objects["trainer"]
    schedule = trainer.lr_scheduler_configs[0].scheduler
    per_epoch = trainer.num_training_batches
    epochs = 50 if method == "reference" else cfg.trainer.max_epochs
    release = release_cosine_lr(cfg.optim.lr, cfg.optim.warmup_steps, per_epoch * epochs)
    for step in range(per_epoch * epochs + 1):
        assert cfg.optim.lr * schedule.lr_lambdas[0](step) == pytest.approx(
            release(step), rel=1e-9, abs=1e-15
        )
    warmup = train_config(method).optim.warmup_steps
    assert warmup == (10000 if method == "reference" else 100)


def test_row7_global_batch(trained):
    method, cfg, objects = trained
    assert objects["datamodule"].batch_size == 32 and objects["trainer"].world_size == 1
    for world in (1, 2, 4):
        per_process = device_batch_size(train_config(method).data, world)
        if method == "reference":  # 8 per GPU x 4 GPUs: 32 pairs per step whatever the device count
            assert per_process * world == 8 * 4
        else:
            assert per_process == train_config(method).data.batch_size
    with pytest.raises(ConfigError, match="data.global_batch_size=32 does not split over 3"):
        device_batch_size(train_config("reference").data, 3)


def test_row8_weight_decay_exemptions(trained):
    method, cfg, objects = trained
    model = objects["module"].model
    optimizer = objects["trainer"].optimizers[0]
    ids = {id(p): n for n, p in model.named_parameters()}
    decayed = {ids[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    release = release_decayed(model.named_parameters())
    assert "visual.class_embedding" in release
    if method == "reference":
        assert decayed == release
    else:
        assert decayed == {n for n in release if model.get_parameter(n).ndim >= 2}


def test_row9_fallback_mask_is_wired(trained):
    method, _, objects = trained
    assert objects["datamodule"].train_set.fallback_mask == (
        "clipped_grey" if method == "reference" else "black"
    )


# ---------------------------------------------------------------------------------------------
# rows 6, 9 and 11


@pytest.mark.parametrize("method", METHODS)
def test_row6_precision_on_a_gpu(method, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    cfg = train_config(method, "trainer=gpu")
    precision = resolve_precision(cfg.trainer.precision, cfg.gpu_precision)
    plugin = MixedPrecision(precision, "cuda")  # what lightning.Trainer builds for it
    dtype = plugin.autocast_context_manager().fast_dtype
    if method == "reference":  # train_all.py: torch.cuda.amp.autocast() (fp16) + GradScaler()
        assert dtype == torch.float16 and isinstance(plugin.scaler, torch.amp.GradScaler)
    else:
        assert dtype == torch.bfloat16 and plugin.scaler is None
    assert (
        resolve_precision(train_config(method, "trainer=cpu").trainer.precision, cfg.gpu_precision)
        == "32-true"
    )


@pytest.mark.parametrize("method", METHODS)
def test_row9_fallback_mask_square(method):
    style = train_config(method).data.fallback_mask
    image = torch.randn(3, 224, 224)
    clipped = 0
    for seed in range(20):
        got = random_square(image, 32, torch.Generator().manual_seed(seed), style)
        changed = (got != image).any(0).nonzero()
        x0, y0 = (int(v) for v in changed.min(0).values)
        if method == "reference":
            release = release_random_mask(image.numpy(), x0, y0)
            assert torch.equal(got, torch.from_numpy(release))
            clipped += x0 > 224 - 32 or y0 > 224 - 32
        else:
            assert len(changed) == 32 * 32 and torch.equal(got[:, x0, y0], torch.tensor(black()))
    if method == "reference":
        assert clipped  # corners drawn in [0, 224): some squares are cut at the borders


@pytest.mark.parametrize("method", METHODS)
def test_row11_captions_longer_than_the_context(method):
    eot = config("evaluate", f"method={method}").text.eot_on_truncation
    assert train_config(method).text.eot_on_truncation == eot
    ours = get_tokenizer("agree-tiny", eot)
    plain = get_tokenizer("agree-tiny")
    texts = [" ".join(["a man in a red shirt"] * 20), "a dog"]
    release = release_tokenize(plain, texts)
    if method == "reference":
        assert torch.equal(ours(texts), release)
        assert release[0, -1] != plain.eot_token_id
    else:
        assert torch.equal(ours(texts), plain(texts)) and ours(texts)[0, -1] == plain.eot_token_id
    assert torch.equal(ours(texts)[1], release[1])  # short captions are the same


# ---------------------------------------------------------------------------------------------
# rows 13 to 20: test-time precision, masked captions, entity rows, EGR arithmetic, DDP gradient,
# logit-scale clamp, AdamW kernel, gallery order


def release_features(model, encode, batches):
    """extract_features_zs_mask+prompt.py: ``convert_models_to_fp32(model)``, no autocast, each
    batch's features divided by their norm."""
    model = model.float()
    with torch.no_grad():
        features = [encode(batch) for batch in batches]
    return torch.cat([f / f.norm(dim=-1, keepdim=True) for f in features])


@pytest.mark.parametrize("method", METHODS)
def test_row13_test_time_precision(method, scenes, monkeypatch):
    monkeypatch.setattr(features_module, "AUTOCAST_DEVICES", ("cuda", "cpu"))  # autocast without CUDA
    cfg = config("evaluate", f"method={method}", f"data.root={scenes.root}", "device=cpu")
    texts, images = read_test_texts(scenes.test_texts), read_test_images(scenes.test_images)
    cpu = torch.device("cpu")
    ours_texts, ours_images, _, _ = model_features(cfg, texts, images, None, scenes, None, cpu)
    L.seed_everything(cfg.seed, verbose=False)  # the same random weights
    model = create_clip(cfg.model.name).eval()
    tokenizer = get_tokenizer(cfg.model.name, cfg.text.eot_on_truncation)
    npz = NpzImages(scenes.images_npz("test"), scenes.image_size)
    pixels = torch.stack([torch.from_numpy(npz[im.image_id]).float() for im in images])
    release_texts = release_features(model, model.encode_text, [tokenizer([t.text for t in texts])])
    release_images = release_features(model, model.encode_image, [pixels])
    for ours, release in ((ours_texts, release_texts), (ours_images, release_images)):
        gap = (ours - release).abs().max().item()
        if method == "reference":
            assert gap < 1e-5
        else:  # bf16 autocast: close, not the same
            assert 1e-4 < gap < 0.1
    # several processes: Lightning's predict loop runs at the same precision
    captured = {}

    def predict(model, jobs, batch_size, trainer):
        captured.update(trainer)
        one = {**trainer, "devices": 1, "strategy": "auto"}  # the same loop in this process
        return predict_features(model, jobs, batch_size, one)

    monkeypatch.setattr(predict_module, "predict_features", predict)
    cfg = config("evaluate", f"method={method}", f"data.root={scenes.root}", "device=cpu", "devices=2")
    passes = {"texts": [t.text for t in texts]}
    several = extraction_module._predicted(cfg, model, tokenizer, cpu, passes)["texts"]
    assert captured["precision"] == ("32-true" if method == "reference" else "bf16-mixed")
    gap = (several - release_texts).abs().max().item()
    assert gap < 1e-5 if method == "reference" else 1e-4 < gap < 0.1


def other_segs_file(scenes, folder):
    """The scenes' text_segs with its lines reversed and each query_text changed ("... there")."""
    rows = [json.loads(line) for line in scenes.test_text_segs.read_text().splitlines()][::-1]
    for row in rows:
        row["query_text"] += " there"
    return write_jsonl(folder / "segs.jsonl", rows)


def release_mask_features(model, tokenizer, line):
    """eval/data.py ``EvalMaskDataset``: the line's query_text with each item replaced by [MASK],
    padded with "" to 10 (or cut), encoded as the extraction script does."""
    masked = [line["query_text"].replace(item, "[MASK]") for item in line["items"]]
    masked = (masked + [""] * 10)[:10]
    return release_features(model, model.encode_text, [tokenizer(masked)])


@pytest.mark.parametrize("method", METHODS)
def test_rows14_15_masked_captions_and_entity_rows_of_the_segs_file(method, scenes, tmp_path):
    segs_file = other_segs_file(scenes, tmp_path)
    cfg = config("evaluate", f"method={method}", "rerank=egr", f"data.root={scenes.root}", "device=cpu")
    texts, images = read_test_texts(scenes.test_texts), read_test_images(scenes.test_images)
    got = model_inputs(cfg, texts, images, scenes, segs_file, None, None, torch.device("cpu"))[0]
    L.seed_everything(cfg.seed, verbose=False)
    model = create_clip(cfg.model.name).eval()
    tokenizer = get_tokenizer(cfg.model.name, cfg.text.eot_on_truncation)
    lines = [json.loads(line) for line in segs_file.read_text().splitlines()]
    line_of = {str(line["query_id"]): line for line in lines}
    for i in (0, 1, len(texts) - 1):  # captions whose segs line is elsewhere in the file
        caption = texts[i]
        assert lines[i]["query_id"] != int(caption.query_id)
        by_id = release_mask_features(model, tokenizer, line_of[caption.query_id])
        by_position = release_mask_features(model, tokenizer, lines[i])
        if method == "reference":  # masked in the segs line's query_text; image->text takes line i
            assert torch.allclose(got.entities.masks[i], by_id, atol=1e-5)
            assert torch.allclose(got.caption_entities.masks[i], by_position, atol=1e-5)
        else:  # masked in the test caption; the caption's own entities in both directions
            assert got.caption_entities is None
            items = line_of[caption.query_id]["items"]
            _, masked = entity_texts(caption.text, items, 10, None)
            n = len(masked)
            assert torch.allclose(got.entities.masks[i, :n], encode_text(model, tokenizer(masked)), atol=1e-5)
            assert not torch.allclose(got.entities.masks[i, :n], by_id[:n], atol=1e-3)


def test_row15_a_caption_without_a_line_at_its_position_is_named(scenes, tmp_path):
    rows = scenes.test_text_segs.read_text().splitlines()[:-1]
    short = write_jsonl(tmp_path / "segs.jsonl", [json.loads(line) for line in rows])
    cfg = config("evaluate", "method=reference", "rerank=egr", f"data.root={scenes.root}", "device=cpu")
    texts, images = read_test_texts(scenes.test_texts), read_test_images(scenes.test_images)
    with pytest.raises(DataFormatError, match=rf"{short}: {len(rows)} rows, but caption .* by_id"):
        model_inputs(cfg, texts, images, scenes, short, None, None, torch.device("cpu"))


@pytest.mark.parametrize("method", METHODS)
def test_row15_image_to_text_entity_rows_by_position(method, release_files, tmp_path):
    _, files, _, _ = release_files
    texts, images, prompts, masks = files
    order = prompts[0][::-1]  # the entity files list the captions in another order than text_jsonl
    moved = (texts, images, lines(*prompts, order), lines(*masks, order))
    owners = {q: images[0][q // 2] for q in texts[0]}
    paths, truth = write_release(tmp_path, moved, owners, {q: 10 for q in texts[0]})
    results = evaluate(
        release_config(paths, tmp_path / "out", f"method={method}", f"annotations.text_segs={paths['segs']}")
    )
    release, by_id = release_egr(*moved), release_egr(*files)  # files: entity lines in text_jsonl's order
    assert release["image_to_text"] != by_id["image_to_text"]
    assert release["text_to_image"] == by_id["text_to_image"]  # text->image looks lines up by id
    expected = release if method == "reference" else by_id
    assert written_lists(tmp_path / "out") == expected
    assert_recalls(results, truth, expected)


def near_ties():
    """Release-format features on which float32 EGR ties two candidates that float64 orders.

    Dyadic values make every product exact. Caption 2 scores images 1000 and 1001 alike but for
    one prompt product 2^-25 larger with 1001 (its image): 1e-10 in the final score, lost in
    float32, so the earlier 1000 comes first; image 1002 scores captions 0 and 1 likewise (1 is its).
    """
    tiny = 2.0**-25

    def vector(**dims):
        out = np.zeros(8, np.float32)
        for name, value in dims.items():
            out[int(name[1:])] = value
        return out

    images = np.stack([vector(d0=0.5, d1=0.25), vector(d0=0.5, d1=0.25 + tiny), vector(d2=1), vector(d3=1)])
    texts = np.stack(
        [vector(d2=0.5), vector(d2=0.5), vector(d0=1), vector(d0=0.5, d4=0.5)]
        + [vector(d3=0.5, d5=0.5), vector(d3=0.5, d4=0.25), vector(d2=0.25, d6=0.5), vector(d1=0.5, d7=0.5)]
    )
    prompts = np.repeat(vector(d5=0.5, d6=0.25)[None, None], 8, 0).repeat(10, 1)
    masks = np.repeat(vector(d4=0.5)[None, None], 8, 0).repeat(10, 1)
    prompts[0], masks[0] = vector(d2=0.25), vector(d2=0.75)
    prompts[1], masks[1] = vector(d2=0.25 + tiny), vector(d2=0.75)
    prompts[2], masks[2] = vector(d1=1), vector(d0=0.5)
    image_ids, query_ids = [str(1000 + i) for i in range(4)], list(range(8))
    owners = dict(zip(query_ids, [image_ids[i] for i in (3, 2, 1, 0, 3, 0, 2, 1)], strict=True))
    return ((query_ids, texts), (image_ids, images), (query_ids, prompts), (query_ids, masks)), owners


@pytest.mark.parametrize("method", METHODS)
def test_row16_egr_arithmetic_on_near_ties(method, tmp_path):
    files, owners = near_ties()
    paths, truth = write_release(tmp_path, files, owners, dict.fromkeys(owners, 10))
    results = evaluate(
        release_config(paths, tmp_path / "out", f"method={method}", f"annotations.text_segs={paths['segs']}")
    )
    release = release_egr(*files)
    got = written_lists(tmp_path / "out")
    assert release["text_to_image"][2][:2] == [1001, 1000] and release["image_to_text"][1002][:2] == [1, 0]
    if method == "reference":
        assert got == release
        assert_recalls(results, truth, release)
    else:  # float32: the near-ties fall back to the earlier candidate
        assert got["text_to_image"][2][:2] == [1000, 1001] and got["image_to_text"][1002][:2] == [0, 1]
        for direction in release:
            assert (
                results["egr"][direction]["r1"] < release_recalls(truth[direction], release[direction])["r1"]
            )


def test_row16_similarities_round_as_the_release():
    """At 768-d a matrix product rounds many similarities differently in the last bit from the
    release's one-row products; float64 EGR takes them one row at a time."""
    g = torch.Generator().manual_seed(0)
    texts, images = (F.normalize(torch.randn(n, 768, generator=g), dim=-1) for n in (24, 100))
    entities = F.normalize(torch.randn(24, 3, 768, generator=g), dim=-1)
    release = torch.tensor(
        [sum((scores(t, images.numpy()[i : i + 32]) for i in range(0, 100, 32)), []) for t in texts.numpy()]
    )
    raw, order = rerank._release_search(texts, images, 100)
    assert torch.equal(raw, release.gather(1, order))
    for j in range(3):  # an entity vector of each caption times its candidates
        products = rerank._row_products(entities[:, j, None], images[order])
        release = torch.tensor([scores(e, images.numpy()) for e in entities[:, j].numpy()])
        assert torch.equal(products, release.gather(1, order))


def release_gathered(x, rank, world):
    """train_all.py with ``--aggregate``: ``dist.all_gather`` (no gradient), this rank's own
    features first, then the others'."""
    parts = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat([x] + parts[:rank] + parts[rank + 1 :])


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    state = torch.load(f"{folder}/inputs.pt", weights_only=False)
    batch = state["batches"][rank]

    def fresh():
        model = create_clip("agree-tiny")
        model.load_state_dict(state["model"])
        return model

    def reduced(model):  # DDP's gradient: the mean over the ranks
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for grad in grads.values():
            dist.all_reduce(grad)
        return {n: g / world for n, g in grads.items()}

    out = {}
    for method, ddp_gradient in state["ddp_gradient"].items():
        model = fresh()
        loss = agree_losses(model, batch, {"clip": 1.0}, 0.0, False, True, ddp_gradient)["clip"]
        loss.backward()
        out[method] = {"loss": loss.item(), "grads": reduced(model)}
        if ddp_gradient == "per_rank_mean":  # every loss (method=agree: test_two_processes_equal_one)
            every = agree_losses(fresh(), batch, state["weights"], 0.0, False, True, ddp_gradient)
            out[method]["every"] = {k: v.item() for k, v in every.items()}
    model = fresh()
    image, text = encode_image(model, batch["images"]), encode_text(model, batch["captions"])
    release = release_clip_loss(
        release_gathered(image, rank, world), release_gathered(text, rank, world), model.logit_scale.exp()
    )
    release.backward()
    out["release"] = {"loss": release.item(), "grads": reduced(model)}
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_row17_ddp_gradient(scenes, tmp_path):
    tokenizer = get_tokenizer("agree-tiny")
    weights = dict.fromkeys(("clip", "prompt", "text_mask", "ground_mask"), 1.0)
    dm = AgreeDataModule(scenes, tokenizer, batch_size=8, needs=inputs_for(weights))
    dm.setup()
    torch.manual_seed(0)
    items = [dm.train_set[i] for i in range(8)]
    collate = CollateTrain(tokenizer, inputs_for(weights), 5)
    torch.manual_seed(3)
    model = create_clip("agree-tiny")
    ddp_gradient = {method: train_config(method).loss_options.ddp_gradient for method in METHODS}
    torch.save(
        {
            "model": model.state_dict(),
            "batches": [collate(items[:4]), collate(items[4:])],
            "ddp_gradient": ddp_gradient,
            "weights": weights,
        },
        tmp_path / "inputs.pt",
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    full = agree_losses(model, collate(items), weights, 0.0, False, True)  # one process, the global batch
    release = ranks[0]["release"]
    for rank in ranks:  # the release: every rank computes the global batch's loss
        assert rank["release"]["loss"] == pytest.approx(full["clip"].item(), rel=1e-5)
    for method in METHODS:
        grads = ranks[0][method]["grads"]
        for name, grad in release["grads"].items():
            if method == "agree" and name != "logit_scale":
                grad = 2 * grad  # the global batch's gradient: W times the release's for the towers
            assert (grads[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-9, name
    for rank in ranks:  # method=reference: every loss, on every rank, is the global batch's
        assert rank["reference"]["every"].keys() == weights.keys()
        for name, value in rank["reference"]["every"].items():
            assert value == pytest.approx(full[name].item(), rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("method", METHODS)
def test_row18_logit_scale_clamp(method):
    optim = train_config(method).optim
    module = AgreeModule("agree-tiny", None, {"clip": 1.0}, max_logit_scale=optim.max_logit_scale)
    logit_scale = module.model.logit_scale
    with torch.no_grad():
        logit_scale.fill_(4.7)
    module.on_train_batch_end()
    release = torch.clamp(torch.tensor(4.7), 0, 4.6052)  # train_all.py, after each step
    if method == "reference":
        assert logit_scale.item() == release.item()
    else:
        assert logit_scale.item() == torch.tensor(math.log(100)).item() != release.item()


@pytest.mark.parametrize("method", METHODS)
def test_row19_adamw_kernel_on_cuda(method, monkeypatch):
    optim = train_config(method).optim
    module = AgreeModule("agree-tiny", None, {"clip": 1.0}, fused_adamw=optim.fused)
    monkeypatch.setattr(AgreeModule, "device", property(lambda self: torch.device("cuda")))
    fused = module.optimizer().defaults["fused"]
    release = torch.optim.AdamW(module.model.parameters()).defaults["fused"]  # main_all.py: optim.AdamW(...)
    assert bool(fused) == (method == "agree") and not release


def test_rows17_to_19_are_wired(trained):
    method, cfg, objects = trained
    hparams = objects["module"].hparams
    assert hparams.ddp_gradient == cfg.loss_options.ddp_gradient
    assert hparams.max_logit_scale == cfg.optim.max_logit_scale
    assert hparams.fused_adamw == cfg.optim.fused


@pytest.mark.parametrize("method", METHODS)
def test_row20_gallery_order_of_the_feature_files(method, release_files, tmp_path):
    _, files, _, _ = release_files
    (text_ids, texts), (image_ids, images), prompts, masks = files
    texts, images = texts.copy(), images.copy()
    texts[9], images[7] = texts[5], images[3]  # exact ties: their order decides
    prompts, masks = (prompts[0], prompts[1].copy()), (masks[0], masks[1].copy())
    prompts[1][9], masks[1][9] = prompts[1][5], masks[1][5]
    tied = ((text_ids, texts), (image_ids, images), prompts, masks)
    text_order, image_order = text_ids[::-1], image_ids[::-1]  # the files' lines, reversed
    in_files = (lines(text_ids, texts, text_order), lines(image_ids, images, image_order))
    in_files += (lines(*prompts, text_order), lines(*masks, text_order))
    owners = {q: image_ids[q // 2] for q in text_ids}
    paths, truth = write_release(tmp_path, in_files, owners, dict.fromkeys(text_ids, 10), text_ids, image_ids)
    results = evaluate(
        release_config(paths, tmp_path / "out", f"method={method}", f"annotations.text_segs={paths['segs']}")
    )
    release, annotation_order = release_egr(*in_files), release_egr(*tied)
    for direction in release:
        assert release[direction] != annotation_order[direction]
    expected = release if method == "reference" else annotation_order
    assert written_lists(tmp_path / "out") == expected
    assert_recalls(results, truth, expected)


@pytest.mark.parametrize("method", METHODS)
def test_row20_gallery_order_of_the_images_npz(method, scenes, tmp_path):
    layout = dataclasses.replace(scenes, root=tmp_path)
    shutil.copytree(scenes.root / "annotation", tmp_path / "annotation")
    with np.load(scenes.images_npz("test")) as npz:
        keys = list(npz.keys())
        np.savez(layout.images_npz("test"), **{key: npz[key] for key in keys[::-1]})
    cfg = config("evaluate", f"method={method}", f"data.root={tmp_path}", "device=cpu")
    texts, images = read_test_texts(scenes.test_texts), read_test_images(scenes.test_images)
    assert [im.image_id for im in images] == keys  # the annotations list the images as the npz did
    got = model_inputs(cfg, texts, images, layout, None, None, None, torch.device("cpu"))[0]
    if method == "reference":  # eval/data.py: the images in the order of the npz's keys
        assert got.image_order.tolist() == list(range(len(images)))[::-1]
    else:
        assert got.image_order is None


# ---------------------------------------------------------------------------------------------
# presets and recall


def job_config(command, *overrides, cli):
    """The config ``python -m agree.<command> ... --cfg job`` prints (``cli=False``: composed in this
    process, as the command line composes it; a process costs seconds)."""
    if not cli:
        return yaml.safe_load(OmegaConf.to_yaml(config(command, *overrides)))
    out = subprocess.run(
        [sys.executable, "-m", f"agree.{command}", *overrides, "--cfg", "job"],
        capture_output=True,
        text=True,
        check=True,
    )
    return yaml.safe_load(out.stdout)


@pytest.mark.parametrize("method", METHODS)
def test_paper_presets_print_the_release_values(method):
    job = job_config("train", "+experiment=flickr30k_finetune", f"method={method}", cli=method == "reference")
    assert job["model"] == {
        "name": "ViT-L-14-quickgelu",
        "pretrained": "openai",
        "image_size": 224,
        "mean": None,
        "std": None,
        "grad_checkpointing": False,
        "compile": False,
    }  # mean and std: the openai tag's
    assert job["losses"] == dict(
        clip=0.9,
        prompt=0.03,
        text_mask=0.1,
        vg_contrast=0.03,
        vg_mask=0.15,
        ground_mask=0.1,
        swap_negatives=0.0,
    )
    optim = job["optim"]
    assert (optim["lr"], optim["weight_decay"], optim["warmup_steps"], optim["schedule_epochs"]) == (
        1e-5,
        0.1,
        10000,
        50,
    )
    assert (optim["betas"], optim["eps"]) == ([0.9, 0.98], 1e-6)
    assert job["trainer"]["max_epochs"] == 2 and job["data"]["global_batch_size"] == 32
    assert job["gpu_precision"] == "16-mixed" and job["method"] == method
    job = job_config("evaluate", "+experiment=flickr30k_zeroshot", f"method={method}", cli=method == "agree")
    assert job["model"]["name"] == "ViT-L-14-quickgelu" and job["model"]["pretrained"] == "openai"
    r = job["rerank"]
    assert (r["stages"], r["k"], r["depth"], r["max_entities"], r["max_entity_words"]) == (
        ["egr", "tbr"],
        20,
        128,
        10,
        None,
    )
    assert r["text_to_image"] == {
        "raw_weight": 0.9,
        "mask_weight": 0.1,
        "base_weight": 0.99,
        "prompt_weight": 0.01,
    }
    assert r["image_to_text"] == {
        "raw_weight": 0.8,
        "prompt_weight": 0.2,
        "base_weight": 0.98,
        "mask_weight": 0.02,
    }
    assert r["absent_rank"] == 10000 and job["features"]["mask_padding"] == (method == "agree")


def test_one_key_flips_one_correction():
    cfg = train_config("reference", "loss_options.margin_gradient=true")
    reference = train_config("reference")
    assert cfg.loss_options.margin_gradient and not reference.loss_options.margin_gradient
    assert {k: v for k, v in cfg.items() if k != "loss_options"} == {
        k: v for k, v in reference.items() if k != "loss_options"
    }


def test_recall_is_exact_from_hit_counts():
    from agree.retrieval.metrics import recall_at_k

    ranked = torch.arange(500)[:, None].repeat(1, 10)
    positives = torch.where(torch.arange(500) < 313, torch.arange(500), -1)[:, None]
    r = recall_at_k(ranked, positives)
    assert (r["r1"], r["r5"], r["r10"]) == (62.6, 62.6, 62.6)
    assert json.dumps(r["r1"]) == "62.6" and math.isclose(r["mean_recall"], 62.6)


@pytest.mark.parametrize("method", METHODS)
def test_row22_margin_reduction(method, tiny_batch):
    """Both methods sum the margin losses over the batch, as the release; the study decides ours."""
    model, batch = tiny_batch
    cfg = train_config(method)
    assert cfg.loss_options.margin_reduction == "sum"
    options = cfg.loss_options
    args = (
        model,
        batch,
        {"ground_mask": 1.0},
        1.0,
        options.skip_duplicate_negatives,
        options.margin_gradient,
    )
    summed = agree_losses(*args, margin_reduction=options.margin_reduction)["ground_mask"]
    assert summed.item() == pytest.approx(
        agree_losses(*args, margin_reduction="mean")["ground_mask"].item() * len(batch["images"])
    )
    flipped = train_config(method, "loss_options.margin_reduction=mean")
    assert flipped.loss_options.margin_reduction == "mean" and {
        k: v for k, v in flipped.loss_options.items() if k != "margin_reduction"
    } == {k: v for k, v in options.items() if k != "margin_reduction"}
