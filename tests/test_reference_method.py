"""``method=reference`` against the release, one test per row of the README's table.

Each test runs our code under both methods (composed from the real configs) on the same small
inputs and compares with a transcription of the release's code written here (EasyNLP
examples/agree: training/data.py, training/train_all.py, training/main_all.py, eval/data.py,
eval/make_topk_predictions_mask+prompt.py, eval/evaluation.py, clip/clip.py).
"""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf

from agree.config import resolve_precision
from agree.data.datasets import CollateTrain, random_square
from agree.data.pixels import black
from agree.data.records import read_test_images, read_test_texts, read_text_segs
from agree.errors import ConfigError
from agree.evaluate import evaluate
from agree.model.clip import create_clip, encode_image, encode_text
from agree.model.module import agree_losses
from agree.model.tokenizer import get_tokenizer
from agree.retrieval.extraction import entity_texts, model_features
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


def release_egr(texts, images, prompts, masks, slots, k=10, topk=128):
    """make_topk_predictions_mask+prompt.py, both directions, over the first ``slots[q]`` entity
    vectors of each query (the release: all 10). texts [T, D], images [I, D], prompts / masks
    [T, 10, D] float32 numpy; returns ranked index lists."""

    def t2i(q):
        used = range(slots[q])
        tuples = []
        for i in range(len(images)):
            score = float(texts[q] @ images[i])
            score_diffs = [score - float(masks[q, j] @ images[i]) for j in used]
            prompt_score = (
                float(np.mean([float(prompts[q, j] @ images[i]) for j in used])) if slots[q] else 0.0
            )
            overall = 0.9 * score + 0.1 * sum(score_diffs)
            tuples.append((i, score, overall, 0.99 * overall + 0.01 * prompt_score))
        return tuples

    def i2t(v):
        tuples = []
        for t in range(len(texts)):
            used = range(slots[t])
            score = float(images[v] @ texts[t])
            score_diffs = [min(0, score - float(images[v] @ masks[t, j])) for j in used]
            prompt_score = (
                float(np.mean([float(images[v] @ prompts[t, j]) for j in used])) if slots[t] else 0.0
            )
            overall = 0.8 * score + 0.2 * prompt_score
            tuples.append((t, score, overall, 0.98 * overall + 0.02 * sum(score_diffs)))
        return tuples

    def rank(tuples):
        top = sorted(tuples, key=lambda x: x[1], reverse=True)[:topk]
        first = sorted(top, key=lambda x: x[2], reverse=True)
        return [entry[0] for entry in sorted(first, key=lambda x: x[3], reverse=True)[:k]]

    return {
        "text_to_image": [rank(t2i(q)) for q in range(len(texts))],
        "image_to_text": [rank(i2t(v)) for v in range(len(images))],
    }


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
    _, _, entities, _ = model_features(cfg, texts, images, segs, scenes, None, torch.device("cpu"))
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

    def write(name, rows):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder / name

    paths = {
        "images": write(
            "imgs.jsonl",
            [{"image_id": i, "feature": f.tolist()} for i, f in zip(image_ids, images, strict=True)],
        ),
        "texts": write("txts.jsonl", [{"query_id": q, "feature": f.tolist()} for q, f in enumerate(texts)]),
        "prompts": write(
            "prompt.jsonl", [{"query_id": q, "feature": f.tolist()} for q, f in enumerate(prompts)]
        ),
        "masks": write("mask.jsonl", [{"query_id": q, "feature": f.tolist()} for q, f in enumerate(masks)]),
        "test_texts": write(
            "test_texts.jsonl",
            [
                {"query_id": q, "query_text": f"t{q}", "item_ids": [int(image_ids[owner[q]])]}
                for q in range(24)
            ],
        ),
        "test_images": write(
            "test_images.jsonl",
            [{"image_id": int(i), "item_ids": [2 * n, 2 * n + 1]} for n, i in enumerate(image_ids)],
        ),
        "segs": write(
            "segs.jsonl",
            [
                {"query_id": q, "query_text": f"t{q}", "items": [f"e{j}" for j in range(n)]}
                for q, n in enumerate(counts)
            ],
        ),
    }
    truth = {
        "text_to_image": {q: [int(image_ids[owner[q]])] for q in range(24)},
        "image_to_text": {int(i): [2 * n, 2 * n + 1] for n, i in enumerate(image_ids)},
    }
    arrays = (texts, images, prompts, masks)
    return paths, arrays, counts, image_ids, truth


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


@pytest.mark.parametrize("method", METHODS)
def test_row4_padded_entity_slots_of_release_feature_files(method, release_files, tmp_path):
    paths, arrays, counts, image_ids, truth = release_files
    out = tmp_path / "out"
    results = evaluate(
        release_config(paths, out, f"method={method}", f"annotations.text_segs={paths['segs']}")
    )
    slots = [10] * 24 if method == "reference" else [min(n, 10) for n in counts]
    expected = release_egr(*arrays, slots)
    other = release_egr(*arrays, [min(n, 10) for n in counts] if method == "reference" else [10] * 24)
    assert expected != other  # padding changes the lists on these inputs
    names = {"text_to_image": ("query_id", image_ids), "image_to_text": ("image_id", list(range(24)))}
    for direction, (key, item_ids) in names.items():
        lines = (out / "predictions" / f"egr_{direction}.jsonl").read_text().splitlines()
        written = {int(json.loads(line)[key]): json.loads(line)["item_ids"] for line in lines}
        queries = list(truth[direction])
        want = {
            q: [int(item_ids[i]) for i in row] for q, row in zip(queries, expected[direction], strict=True)
        }
        assert written == want
        recalls = release_recalls(truth[direction], want)
        for k in ("r1", "r5", "r10"):
            assert results["egr"][direction][k] == pytest.approx(recalls[k], rel=1e-12)


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
def test_row13_margin_reduction(method, tiny_batch):
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
    summed = agree_losses(*args, options.margin_reduction)["ground_mask"]
    assert summed.item() == pytest.approx(
        agree_losses(*args, "mean")["ground_mask"].item() * len(batch["images"])
    )
    flipped = train_config(method, "loss_options.margin_reduction=mean")
    assert flipped.loss_options.margin_reduction == "mean" and {
        k: v for k, v in flipped.loss_options.items() if k != "margin_reduction"
    } == {k: v for k, v in options.items() if k != "margin_reduction"}
