"""TBR and EGR against plain per-query loops that follow the method description literally."""

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from agree.retrieval import rerank
from agree.retrieval.reference_loops import loop_egr_i2t, loop_egr_t2i, loop_tbr
from agree.retrieval.rerank import ACCUMULATE, egr_image_to_text, egr_text_to_image, tbr
from agree.retrieval.search import topk_similarity

SEEDS = range(4)
# Dyadic weights keep every score exact in float32 and float64 on integer features, so
# ties in the tie-heavy tests are the same ties in the loop and in the vectorised code.
EXACT_T2I = {"raw_weight": 0.75, "mask_weight": 0.25, "base_weight": 0.5, "prompt_weight": 0.5}
EXACT_I2T = {"raw_weight": 0.75, "prompt_weight": 0.25, "base_weight": 0.5, "mask_weight": 0.5}


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force several chunks and buckets on test-sized inputs."""
    monkeypatch.setattr(rerank, "_TBR_ELEMENTS", 40)
    monkeypatch.setattr(rerank, "_T2I_ELEMENTS", 60)
    monkeypatch.setattr(rerank, "_I2T_CHUNK", 4)
    monkeypatch.setattr(rerank, "_PAIR_ROWS", 12)


# ---------------------------------------------------------------- data


def entity_data(g: torch.Generator, n_captions: int, n_images: int, n_entities: int, dim: int, ties: bool):
    """Caption and image features, per-caption entity features and validity (-> 5 tensors).

    Caption 0 has no valid entity and caption 1 only valid ones; valid slots sit anywhere in a
    row. Padded slots hold huge finite garbage, which must never reach a score.
    """

    def features(*shape: int) -> torch.Tensor:
        if ties:
            return torch.randint(-1, 2, shape, generator=g).float()
        return torch.randn(*shape, generator=g)

    if ties:  # 0, 1, 2 or 4 (= n_entities in these tests) valid slots keep the means exact
        counts = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (n_captions,), generator=g)]
    else:
        counts = torch.randint(0, n_entities + 1, (n_captions,), generator=g)
    counts[0], counts[1] = 0, n_entities
    slot_rank = torch.rand(n_captions, n_entities, generator=g).argsort(dim=1).argsort(dim=1)
    valid = slot_rank < counts[:, None]
    prompts, masks = features(n_captions, n_entities, dim), features(n_captions, n_entities, dim)
    garbage = 1e30 * torch.randn(n_captions, n_entities, dim, generator=g)
    prompts = torch.where(valid[..., None], prompts, garbage)
    masks = torch.where(valid[..., None], masks, -garbage)
    return features(n_captions, dim), features(n_images, dim), prompts, masks, valid


# ---------------------------------------------------------------- TBR


def random_lists(g: torch.Generator, rows: int, n_items: int, width: int) -> torch.Tensor:
    """Distinct item ids per row, with some rows padded by -1 at the end."""
    lists = torch.stack([torch.randperm(n_items, generator=g)[:width] for _ in range(rows)])
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    lengths[: rows // 2] = width
    return torch.where(torch.arange(width)[None, :] < lengths[:, None], lists, -1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sizes", [(9, 5, 4, 3), (12, 30, 6, 10), (7, 7, 7, 7)])
def test_tbr_matches_loop_on_random_lists(seed: int, sizes: tuple, small_chunks: None) -> None:
    n_queries, n_gallery, k, kb = sizes
    g = torch.Generator().manual_seed(seed)
    forward = random_lists(g, n_queries, n_gallery, k)
    backward = random_lists(g, n_gallery, n_queries, kb)
    assert tbr(forward, backward).tolist() == loop_tbr(forward.tolist(), backward.tolist())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_tbr_matches_loop_on_search_lists(seed: int, ties: bool, small_chunks: None) -> None:
    g = torch.Generator().manual_seed(seed)
    texts, images, *_ = entity_data(g, 15, 8, 1, 3, ties)
    forward = topk_similarity(texts, images, 5)[1]
    backward = topk_similarity(images, texts, 4)[1]
    result = tbr(forward, backward)
    assert result.tolist() == loop_tbr(forward.tolist(), backward.tolist())
    # Only the order changes: the set, hence recall at the full list length, is unchanged.
    assert torch.equal(result.sort(dim=1).values, forward.sort(dim=1).values)
    positives = torch.randint(0, 8, (15, 1), generator=g)
    hits = lambda lists: (lists == positives).any(dim=1)  # noqa: E731
    assert torch.equal(hits(result), hits(forward))


def test_tbr_keeps_list_when_query_is_top1_of_its_top1() -> None:
    forward = torch.tensor([[2, 1, 0], [0, 2, 1]])
    backward = torch.tensor([[0, -1], [1, -1], [0, 1]])
    # Query 0 is first in backward[2], its top-1's list: kept, although the sums 0 + 0,
    # 1 + 10000 and 2 + 0 would move item 0 before item 1.
    # Query 1 is not first in backward[0]: sums 0 + 10000, 1 + 1, 2 + 0; items 2 and 1 tie
    # and keep their forward order.
    assert tbr(forward, backward).tolist() == [[2, 1, 0], [2, 1, 0]]
    backward[2] = torch.tensor([1, 0])  # query 0 drops to second place there: re-ranked
    assert tbr(forward, backward).tolist() == [[2, 0, 1], [2, 1, 0]]


def test_tbr_absent_rank_is_10000() -> None:
    kb = 10003
    backward = torch.full((4, kb), -1)
    backward[0, 10001] = 0  # query 0 at backward rank 10001 of item 0; absent from item 1
    backward[2, 10002] = 1  # query 1 at backward rank 10002 of item 2; absent from item 3
    forward = torch.tensor([[0, 1], [2, 3]])
    # q0: 0 + 10001 vs 1 + 10000 -> tie, forward order; q1: 0 + 10002 vs 1 + 10000 -> swap.
    assert tbr(forward, backward).tolist() == [[0, 1], [3, 2]]
    assert tbr(forward, backward, absent_rank=10001).tolist() == [[0, 1], [2, 3]]


def test_tbr_padding_stays_at_end() -> None:
    forward = torch.tensor([[1, 0, -1, -1], [-1, -1, -1, -1]])
    backward = torch.tensor([[1], [1]])  # query 0 absent everywhere: ranks 10000, 10001
    assert tbr(forward, backward).tolist() == [[1, 0, -1, -1], [-1, -1, -1, -1]]
    backward = torch.tensor([[0], [1]])  # query 0: 0 + 10000 vs 1 + 0 -> swap
    assert tbr(forward, backward).tolist() == [[0, 1, -1, -1], [-1, -1, -1, -1]]


def test_tbr_validation() -> None:
    with pytest.raises(ValueError, match="2-D"):
        tbr(torch.zeros(3, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one"):
        tbr(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.int64))


# ---------------------------------------------------------------- EGR


def test_egr_defaults_are_the_published_ones() -> None:
    def defaults(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    assert defaults(egr_text_to_image) == {
        "depth": 128,
        "raw_weight": 0.9,
        "mask_weight": 0.1,
        "base_weight": 0.99,
        "prompt_weight": 0.01,
        "search": None,
        "accumulate": "float32",
    }
    assert defaults(egr_image_to_text) == {
        "depth": 128,
        "raw_weight": 0.8,
        "prompt_weight": 0.2,
        "base_weight": 0.98,
        "mask_weight": 0.02,
        "search": None,
        "accumulate": "float32",
    }
    # and the rerank=egr config states the same values
    config = OmegaConf.load(Path(rerank.__file__).parents[1] / "conf" / "rerank" / "egr.yaml")
    assert config.depth == 128
    for fn, direction in ((egr_text_to_image, "text_to_image"), (egr_image_to_text, "image_to_text")):
        assert {n: v for n, v in defaults(fn).items() if n.endswith("weight")} == dict(config[direction])


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_egr_reuses_a_deeper_search(seed: int) -> None:
    """Candidates from a search deeper than `depth` give the same lists as EGR's own search."""
    g = torch.Generator().manual_seed(seed)
    texts, images, prompts, masks, valid = entity_data(g, 30, 12, 4, 8, ties=False)
    own = egr_text_to_image(texts, images, prompts, masks, valid, 5, depth=9)
    deeper = topk_similarity(texts, images, 11)
    assert torch.equal(
        egr_text_to_image(texts, images, prompts, masks, valid, 5, depth=9, search=deeper), own
    )
    own = egr_image_to_text(images, texts, prompts, masks, valid, 5, depth=9)
    deeper = topk_similarity(images, texts, 20)
    assert torch.equal(
        egr_image_to_text(images, texts, prompts, masks, valid, 5, depth=9, search=deeper), own
    )
    with pytest.raises(ValueError, match="fewer than 9 candidates"):
        egr_text_to_image(
            texts, images, prompts, masks, valid, 5, depth=9, search=topk_similarity(texts, images, 4)
        )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k,depth", [(5, 9), (20, 128), (3, 3)])
@pytest.mark.parametrize("accumulate", ACCUMULATE)
def test_egr_text_to_image_matches_loop(
    seed: int, ties: bool, k: int, depth: int, accumulate: str, small_chunks: None
) -> None:
    g = torch.Generator().manual_seed(seed)
    texts, images, prompts, masks, valid = entity_data(g, 11, 14, 4, 4 if ties else 8, ties)
    weights = EXACT_T2I if ties else {}
    result = egr_text_to_image(
        texts, images, prompts, masks, valid, k, depth, accumulate=accumulate, **weights
    )
    assert result.dtype == torch.int64 and result.shape == (11, min(k, depth, 14))
    assert result.tolist() == loop_egr_t2i(texts, images, prompts, masks, valid, k, depth, **weights)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k,depth", [(5, 9), (20, 128), (3, 3)])
@pytest.mark.parametrize("accumulate", ACCUMULATE)
def test_egr_image_to_text_matches_loop(
    seed: int, ties: bool, k: int, depth: int, accumulate: str, small_chunks: None
) -> None:
    g = torch.Generator().manual_seed(seed)
    captions, images, prompts, masks, valid = entity_data(g, 14, 11, 4, 4 if ties else 8, ties)
    weights = EXACT_I2T if ties else {}
    result = egr_image_to_text(
        images, captions, prompts, masks, valid, k, depth, accumulate=accumulate, **weights
    )
    assert result.dtype == torch.int64 and result.shape == (11, min(k, depth, 14))
    assert result.tolist() == loop_egr_i2t(images, captions, prompts, masks, valid, k, depth, **weights)


@pytest.mark.parametrize("seed", SEEDS)
def test_egr_ignores_padded_slot_contents(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    texts, images, prompts, masks, valid = entity_data(g, 9, 12, 4, 6, False)
    garbage = torch.randn(prompts.shape, generator=g) * 1e20
    other_prompts = torch.where(valid[..., None], prompts, garbage)
    other_masks = torch.where(valid[..., None], masks, garbage.flip(0))
    zeros_prompts = torch.where(valid[..., None], prompts, 0.0)
    zeros_masks = torch.where(valid[..., None], masks, 0.0)
    for fn, query, gallery in [(egr_text_to_image, texts, images), (egr_image_to_text, images[:9], texts)]:
        results = {
            tuple(map(tuple, fn(query, gallery, p, m, valid, 6, 10).tolist()))
            for p, m in [(prompts, masks), (other_prompts, other_masks), (zeros_prompts, zeros_masks)]
        }
        assert len(results) == 1


@pytest.mark.parametrize("accumulate", ACCUMULATE)
def test_egr_without_any_valid_entity_keeps_search_order(accumulate: str) -> None:
    g = torch.Generator().manual_seed(0)
    texts, images = torch.randn(6, 5, generator=g), torch.randn(10, 5, generator=g)
    entities = torch.randn(6, 3, 5, generator=g)
    valid = torch.zeros(6, 3, dtype=torch.bool)
    search_order = topk_similarity(texts, images, 4)[1]
    got = egr_text_to_image(texts, images, entities, entities, valid, 4, 8, accumulate=accumulate)
    assert torch.equal(got, search_order)
    # Image->text with no caption entities: base = 0.8 s, score = 0.98 base -> search order too.
    images_as_queries = images[:6]
    expected = topk_similarity(images_as_queries, texts, 4)[1]
    got = egr_image_to_text(images_as_queries, texts, entities, entities, valid, 4, 8, accumulate=accumulate)
    assert torch.equal(got, expected)


def test_egr_reorders_by_entities() -> None:
    text = torch.tensor([[1.0, 0.0, 0.0]])
    images = torch.tensor([[0.9, 0.0, 0.0], [0.8, 0.5, 0.0]])
    prompt = torch.tensor([[[0.0, 1.0, 0.0]]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    # Raw order [0, 1]; the prompt term (weight 0.5) favours image 1: 0.5 * 0.8 + 0.5 * 0.5 > 0.45.
    weights = {"raw_weight": 1.0, "mask_weight": 0.0, "base_weight": 0.5, "prompt_weight": 0.5}
    assert egr_text_to_image(text, images, prompt, prompt, valid, 2, **weights).tolist() == [[1, 0]]
    assert egr_text_to_image(text, images, prompt, prompt, valid, 2).tolist() == [[0, 1]]


def test_egr_image_to_text_score_ties_fall_back_to_the_base_score() -> None:
    """Captions 0 and 1 tie on the final score; caption 1 has the higher base (its prompt), caption 0
    the higher raw score. The release sorts by raw, base, then score, so caption 1 comes first."""
    image = torch.tensor([[1.0, 1.0, 0.0]])
    captions = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # raw 2 and 1
    prompts = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, 4.0, 0.0]]])  # base 1.5 and 1.75
    masks = torch.tensor([[[0.0, 0.0, 0.0]], [[1.25, 0.0, 0.0]]])  # penalty 0 and -0.25: score 0.75
    valid = torch.ones(2, 1, dtype=torch.bool)
    args = (image, captions, prompts, masks, valid, 2, 2)
    assert loop_egr_i2t(*args, **EXACT_I2T) == [[1, 0]]
    assert egr_image_to_text(*args, **EXACT_I2T).tolist() == [[1, 0]]


@pytest.mark.parametrize("accumulate", ACCUMULATE)
def test_empty_inputs(accumulate: str) -> None:
    feats, ents, valid = torch.randn(4, 5), torch.randn(4, 3, 5), torch.ones(4, 3, dtype=torch.bool)
    none, no_ents, no_valid = feats[:0], ents[:0], valid[:0]
    a = {"accumulate": accumulate}
    assert egr_text_to_image(feats, none, ents, ents, valid, 3, **a).shape == (4, 0)
    assert egr_text_to_image(none, feats, no_ents, no_ents, no_valid, 3, **a).shape == (0, 3)
    assert egr_image_to_text(feats, none, no_ents, no_ents, no_valid, 3, **a).shape == (4, 0)
    assert egr_image_to_text(none, feats, ents, ents, valid, 3, **a).shape == (0, 3)
    assert tbr(torch.zeros(0, 3, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64)).shape == (0, 3)


def test_egr_validation() -> None:
    feats, ents, valid = torch.zeros(3, 4), torch.zeros(3, 2, 4), torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool"):
        egr_text_to_image(feats, feats, ents, ents, valid.int(), 2)
    with pytest.raises(ValueError, match="prompts and masks"):
        egr_image_to_text(feats, feats, ents[:, :1], ents, valid, 2)
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        egr_text_to_image(feats, torch.zeros(3, 5), ents, ents, valid, 2)
    with pytest.raises(ValueError, match="k and depth"):
        egr_image_to_text(feats, feats, ents, ents, valid, 0)
