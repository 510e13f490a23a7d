"""Swap negatives: the swapped captions (real Flickr30k captions, the scenes), the loss against a
direct transcription, its gradients, and what it costs when on and when off."""

import csv
import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from agree.data.datamodule import AgreeDataModule
from agree.data.datasets import CollateTrain
from agree.data.entities import kept_entities
from agree.data.swaps import draw_swaps, entity_spans, swap_candidates, swapped_caption
from agree.model import losses, module
from agree.model.clip import create_clip
from agree.model.module import agree_losses
from agree.model.registry import inputs_for
from agree.model.tokenizer import get_tokenizer

from .conftest import SHARED_DATA

MULTI30K_TEST = SHARED_DATA / "flickr30k_captions_multi30k" / "test_1k_captions.tsv"
ON = {"clip": 1.0, "swap_negatives": 1.0}
OFF = {"clip": 1.0, "swap_negatives": 0.0}


def words(text):
    return Counter(re.findall(r"\w+", text.lower()))


def check_swap(caption, swap):
    """Same words, in another order, never the caption itself."""
    assert swap.lower() != caption.lower()
    assert words(swap) == words(caption), (caption, swap)
    assert re.findall(r"\w+", swap.lower()) != re.findall(r"\w+", caption.lower())


@pytest.fixture(scope="module")
def flickr_captions():
    """Real Flickr30k test captions with their segs as ``agree.prepare entities`` makes them."""
    if not MULTI30K_TEST.is_file():
        pytest.skip(f"{MULTI30K_TEST} not available")
    prepare = pytest.importorskip(
        "agree.prepare.entities", reason="the prepare extra (spaCy) is not installed"
    )
    with open(MULTI30K_TEST, encoding="utf-8") as f:
        captions = [row["caption"] for row in csv.DictReader(f, delimiter="\t")][:150]
    return list(zip(captions, prepare.caption_entities(captions), strict=True))


def test_swaps_of_real_flickr30k_captions(flickr_captions):
    swapped = 0
    for caption, segs in flickr_captions:
        entities = kept_entities(segs, 7, 5)  # the training rule (SPEC §1)
        candidates = swap_candidates(caption, entities)
        for swap in candidates:
            check_swap(caption, swap)
        assert len(candidates) == len(set(candidates))
        swapped += bool(candidates)
        if len(entity_spans(caption, entities)) < 2:
            assert candidates == [] and swapped_caption(caption, entities, torch.Generator()) is None
    assert swapped / len(flickr_captions) > 0.9  # nearly every caption has two entities
    by_caption = {c: swap_candidates(c, kept_entities(s, 7, 5)) for c, s in flickr_captions}
    # two entities with distinct attributes: the attributes change places, the heads stay
    assert by_caption["A dog runs on the green grass near a wooden fence."] == [
        "A dog runs on a wooden grass near the green fence."
    ]
    # no attributes to exchange: two entity spans change places
    assert by_caption["Three men are working on a roof."] == ["a roof are working on Three men."]


def test_scenes_swap_the_binding_of_colours_and_shapes():
    caption = "a red circle left of a blue square"
    segs = ["a red circle", "a blue square", caption]  # as the scenes' segs: the longest last
    assert swap_candidates(caption, segs) == ["a blue circle left of a red square"]
    three = "from left to right: a red circle, a blue square and an orange cross"
    found = swap_candidates(three, ["a red circle", "a blue square", "an orange cross"])
    assert sorted(found) == sorted(
        [
            "from left to right: a blue circle, a red square and an orange cross",
            "from left to right: an orange circle, a blue square and a red cross",
            "from left to right: a red circle, an orange square and a blue cross",
        ]
    )


def test_the_shortest_entities_are_the_spans():
    """The release's own segs list longer phrases before the chunks they hold (SPEC §4)."""
    caption = "Four men on top of a tall structure."
    segs = [
        "four men",
        "top of a tall structure",
        "top",
        "four men on top of a tall structure.",
        "a tall structure",
    ]
    assert [caption[a:b] for a, b in entity_spans(caption, segs)] == ["Four men", "top", "a tall structure"]


def test_no_swap_without_two_distinct_entities():
    assert swap_candidates("A dog runs.", ["a dog"]) == []
    assert swap_candidates("A dog runs.", ["a dog", "a cat"]) == []  # an entity not in the caption
    assert swap_candidates("a dog and a dog", ["a dog"]) == []  # only the caption itself
    assert swap_candidates("the stop sign", ["top", "the stop sign"]) == []  # whole words only
    assert swap_candidates("a man and a woman", ["a man", "a woman"]) == ["a woman and a man"]


def test_swaps_are_drawn_per_seed(flickr_captions):
    def draws(seed):
        captions, segs = zip(*flickr_captions, strict=True)
        return draw_swaps(captions, [kept_entities(s, 7, 5) for s in segs], seed)

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


# --------------------------------------------------------------------------------------------
# the loss


def swap_loss_by_hand(image, captions, swaps, has_swap, scale, same=None):
    """Mean over images i with a swap of -log softmax([s·v_i·t_j for j kept] + [s·v_i·swap_i])[i]."""
    terms = []
    for i in range(len(image)):
        if not has_swap[i]:
            continue
        cols = [j for j in range(len(captions)) if j == i or not (same and same(i, j))]
        logits = [scale * float(image[i] @ captions[j]) for j in cols] + [scale * float(image[i] @ swaps[i])]
        terms.append(-(logits[cols.index(i)] - math.log(sum(math.exp(v) for v in logits))))
    return sum(terms) / len(terms)


def features(n, seed=0):
    torch.manual_seed(seed)
    return [F.normalize(torch.randn(n, 5), dim=-1) for _ in range(3)]


def test_loss_equals_its_transcription():
    image, captions, swaps = features(5)
    has_swap = torch.tensor([True, False, True, True, False])
    scale = torch.tensor(8.0)
    plain = losses.swap_negatives_loss(image, captions, swaps, has_swap, scale)
    assert plain.item() == pytest.approx(swap_loss_by_hand(image, captions, swaps, has_swap, 8.0), rel=1e-5)
    # rows 0 and 2 show one image: neither caption is the other's negative
    keys = torch.tensor([[1, 10], [2, 11], [1, 12], [3, 13], [4, 14]])
    same = lambda i, j: bool((keys[i] == keys[j]).any())  # noqa: E731
    got = losses.swap_negatives_loss(image, captions, swaps, has_swap, scale, keys_all=keys)
    assert got.item() == pytest.approx(
        swap_loss_by_hand(image, captions, swaps, has_swap, 8.0, same), rel=1e-5
    )
    # the swap is a negative: a swap close to the image costs more than one far from it
    near = losses.swap_negatives_loss(image, captions, image, has_swap, scale)
    assert near > plain > losses.swap_negatives_loss(image, captions, -image, has_swap, scale)


def test_one_image_with_a_swap_is_the_loss_of_that_image():
    """The mean over the images with a swap divides by their count, here 1."""
    image, captions, swaps = features(4, seed=3)
    has_swap = torch.tensor([False, False, True, False])
    got = losses.swap_negatives_loss(image, captions, swaps, has_swap, torch.tensor(6.0))
    assert got.item() == pytest.approx(swap_loss_by_hand(image, captions, swaps, has_swap, 6.0), rel=1e-5)


def test_rank_shares_average_to_the_global_loss():
    image, captions, swaps = features(6, seed=1)
    has_swap = torch.tensor([True, False, False, True, True, True])
    scale = torch.tensor(5.0)
    whole = losses.swap_negatives_loss(image, captions, swaps, has_swap, scale)
    ranks = [
        losses.swap_negatives_loss(
            image[r * 3 : r * 3 + 3],
            captions,
            swaps[r * 3 : r * 3 + 3],
            has_swap[r * 3 : r * 3 + 3],
            scale,
            r * 3,
            has_swap,
        )
        for r in (0, 1)
    ]
    assert (sum(ranks) / 2).item() == pytest.approx(whole.item(), rel=1e-5)


def test_gradients_flow_through_the_swaps():
    image, captions, swaps = features(4, seed=2)
    swaps.requires_grad_(True)
    has_swap = torch.tensor([True, False, True, False])
    losses.swap_negatives_loss(image, captions, swaps, has_swap, torch.tensor(10.0)).backward()
    moved = swaps.grad.abs().sum(-1)
    assert (moved[has_swap] > 0).all() and (moved[~has_swap] == 0).all()
    none = losses.swap_negatives_loss(
        image, captions, swaps, torch.zeros(4, dtype=torch.bool), torch.tensor(1.0)
    )
    assert none.item() == 0 and none.requires_grad


# --------------------------------------------------------------------------------------------
# wired through the dataset and the model


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("agree-tiny")


@pytest.fixture(scope="module")
def items(scenes):
    dm = AgreeDataModule(scenes, get_tokenizer("agree-tiny"), needs=inputs_for(ON))
    dm.setup()
    return [dm.train_set[i] for i in range(6)] + [{**dm.train_set[6], "swap": None}]


def counting_encoder(monkeypatch):
    """Count the text tower's calls and the texts it encodes in ``agree_losses``."""
    counts = {"calls": 0, "texts": 0}
    encode = module.encode_text

    def counted(model, tokens, lengths=None):
        counts["calls"] += 1
        counts["texts"] += len(tokens)
        return encode(model, tokens, lengths)

    monkeypatch.setattr(module, "encode_text", counted)
    return counts


def test_scenes_items_carry_a_swap_per_seed_and_epoch(scenes, items):
    for item in items[:6]:
        check_swap(item["caption"], item["swap"])
    dm = AgreeDataModule(scenes, get_tokenizer("agree-tiny"), needs=inputs_for(ON))
    dm.setup()
    assert [dm.train_set[i]["swap"] for i in range(6)] == [it["swap"] for it in items[:6]]
    three = [i for i, r in enumerate(dm.train_set.records) if len(dm.train_set.entities(r)) >= 3][:10]
    assert {dm.train_set[(i, 0)]["swap"] for i in three} != {dm.train_set[(i, 1)]["swap"] for i in three}
    off = AgreeDataModule(scenes, get_tokenizer("agree-tiny"), needs=inputs_for(OFF))
    off.setup()
    assert "swap" not in off.train_set[0]


def test_swaps_are_masked_never_padded(items, tokenizer):
    batch = CollateTrain(tokenizer, inputs_for(ON))(items)
    assert batch["swap_valid"].tolist() == [True] * 6 + [False]
    assert torch.equal(batch["swap_captions"], tokenizer([it["swap"] for it in items[:6]]))
    none = CollateTrain(tokenizer, inputs_for(ON))([items[-1], items[-1]])
    assert none["swap_captions"].shape[0] == 0 and not none["swap_valid"].any()
    torch.manual_seed(0)
    assert agree_losses(create_clip("agree-tiny"), none, ON)["swap_negatives"] == 0


def test_on_the_swaps_train_the_text_tower_off_they_cost_nothing(items, tokenizer, monkeypatch):
    counts = counting_encoder(monkeypatch)
    torch.manual_seed(0)
    model = create_clip("agree-tiny")
    off = agree_losses(model, CollateTrain(tokenizer, inputs_for(OFF))(items), OFF)
    assert set(off) == {"clip"} and counts == {"calls": 1, "texts": len(items)}
    counts.update(calls=0, texts=0)
    out = agree_losses(model, CollateTrain(tokenizer, inputs_for(ON))(items), {"swap_negatives": 1.0})
    assert counts == {"calls": 1, "texts": len(items) + 6}  # the swaps join the captions' one call
    out["swap_negatives"].backward()
    assert out["swap_negatives"] > 0
    assert model.token_embedding.weight.grad.abs().sum() > 0  # the text tower learns from the swaps
