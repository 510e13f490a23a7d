"""Exact tiled top-k search against a full stable sort."""

import pytest
import torch

from agree.retrieval.search import topk_both, topk_similarity


def reference_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[list, list]:
    """Per query: score every gallery item, stable-sort descending, keep the first k."""
    all_scores, all_indices = [], []
    for q in queries.double().tolist():
        row = [sum(a * b for a, b in zip(q, g, strict=True)) for g in gallery.double().tolist()]
        order = sorted(range(len(row)), key=lambda i: row[i], reverse=True)[:k]
        all_scores.append([row[i] for i in order])
        all_indices.append(order)
    return all_scores, all_indices


def tie_heavy(generator: torch.Generator, rows: int, dim: int) -> torch.Tensor:
    """Small integer features: many exactly equal scores, all exact in float32."""
    return torch.randint(-1, 2, (rows, dim), generator=generator).float()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 4, 9, 40])
@pytest.mark.parametrize("data", ["random", "ties"])
def test_matches_stable_sort(seed: int, k: int, data: str) -> None:
    g = torch.Generator().manual_seed(seed)
    if data == "random":
        queries, gallery = torch.randn(10, 6, generator=g), torch.randn(23, 6, generator=g)
    else:
        queries, gallery = tie_heavy(g, 10, 3), tie_heavy(g, 23, 3)
    scores, indices = topk_similarity(queries, gallery, k, query_chunk=3, gallery_tile=7)
    ref_scores, ref_indices = reference_topk(queries, gallery, k)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert indices.shape == (10, min(k, 23))
    assert indices.tolist() == ref_indices
    expected = torch.tensor(ref_scores, dtype=torch.float64)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


def test_all_scores_equal_gives_gallery_order() -> None:
    queries, gallery = torch.ones(2, 4), torch.ones(17, 4)
    _, indices = topk_similarity(queries, gallery, 5, query_chunk=1, gallery_tile=3)
    assert indices.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_negative_zero_ties_with_zero() -> None:
    queries = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [-0.0, -1.0], [0.0, 0.0]])  # scores -1, 0, -0, 0
    assert topk_similarity(queries, gallery, 4, gallery_tile=2)[1].tolist() == [[1, 2, 3, 0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_score_in_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    queries, gallery = tie_heavy(g, 5, 8).to(dtype), tie_heavy(g, 12, 8).to(dtype)
    scores, indices = topk_similarity(queries, gallery, 6, gallery_tile=5)
    _, ref_indices = reference_topk(queries.float(), gallery.float(), 6)
    assert scores.dtype == torch.float32
    assert indices.tolist() == ref_indices


def test_empty_queries() -> None:
    scores, indices = topk_similarity(torch.zeros(0, 3), torch.zeros(5, 3), 2)
    assert scores.shape == indices.shape == (0, 2)


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 2\)"):
        topk_similarity(torch.zeros(4, 3), torch.zeros(5, 2), 1)
    with pytest.raises(ValueError, match="2-D"):
        topk_similarity(torch.zeros(3), torch.zeros(5, 3), 1)
    with pytest.raises(ValueError, match="k must be"):
        topk_similarity(torch.zeros(4, 3), torch.zeros(5, 3), 0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("k", "k_back"), [(1, 1), (4, 9), (9, 4), (40, 40)])
@pytest.mark.parametrize("data", ["random", "ties"])
@pytest.mark.parametrize(("query_chunk", "gallery_tile"), [(3, 7), (4096, 65536)])
def test_one_pass_equals_per_direction_search(
    seed: int, k: int, k_back: int, data: str, query_chunk: int, gallery_tile: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    if data == "random":  # multiples of 1/64 in 4-d: every score is exact in float32 either way round
        queries, gallery = (torch.randint(-64, 65, (n, 4), generator=g) / 64.0 for n in (17, 23))
    else:
        queries, gallery = tie_heavy(g, 17, 3), tie_heavy(g, 23, 3)
    forward, backward = topk_both(queries, gallery, k, k_back, query_chunk, gallery_tile)
    for got, want in zip(
        (forward, backward),
        (topk_similarity(queries, gallery, k), topk_similarity(gallery, queries, k_back)),
        strict=True,
    ):
        assert got[1].tolist() == want[1].tolist()
        assert torch.equal(got[0], want[0])
    assert backward[1].tolist() == reference_topk(gallery, queries, k_back)[1]


def test_one_pass_default_k_back_and_empty_sides() -> None:
    queries, gallery = torch.ones(3, 2), torch.ones(5, 2)
    (_, forward), (_, backward) = topk_both(queries, gallery, 4, gallery_tile=2)
    assert forward.tolist() == [[0, 1, 2, 3]] * 3 and backward.tolist() == [[0, 1, 2]] * 5
    (scores, forward), (_, backward) = topk_both(torch.zeros(0, 2), gallery, 2)
    assert forward.shape == (0, 2) and backward.shape == (5, 0) and scores.dtype == torch.float32
    with pytest.raises(ValueError, match="k must be"):
        topk_both(queries, gallery, 2, 0)
