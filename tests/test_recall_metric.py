"""The validation metric against torchmetrics' hit rate (the recall papers report), as device tensors."""

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalHitRate

from agree.retrieval.metrics import positives_from_pairs, recall_at_k
from agree.retrieval.recall_metric import RetrievalRecallMetric


def hit_rate(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """torchmetrics' RetrievalHitRate@k over a [Q, N] score matrix, in percent."""
    queries = torch.arange(scores.shape[0])[:, None].expand_as(scores)
    # shifted above 0: torchmetrics ignores relevant items scored <= 0
    metric = RetrievalHitRate(top_k=k)
    return float(metric(scores.flatten() + 2, relevant.flatten(), indexes=queries.flatten())) * 100


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_torchmetrics_hit_rate_in_both_directions(seed):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(20, 16, generator=generator), dim=-1)
    text_image = torch.arange(20).repeat_interleave(5)  # five captions per image
    texts = F.normalize(images[text_image] + 1.2 * torch.randn(100, 16, generator=generator), dim=-1)
    metric = RetrievalRecallMetric()
    for part in torch.arange(20).split(7):  # several validation batches
        captions = torch.isin(text_image, part)
        metric.update(images[part], part, texts[captions], captions.nonzero()[:, 0], text_image[captions])
    results = metric.compute()
    assert all(isinstance(v, torch.Tensor) and v.device == images.device for v in results.values())
    relevant = text_image[:, None] == torch.arange(20)[None, :]  # [texts, images]
    for k in (1, 5, 10):
        assert float(results[f"t2i_r{k}"]) == pytest.approx(hit_rate(texts @ images.T, relevant, k), abs=1e-4)
        assert float(results[f"i2t_r{k}"]) == pytest.approx(
            hit_rate(images @ texts.T, relevant.T, k), abs=1e-4
        )
    assert 0 < float(results["t2i_r1"]) < 100 and 0 < float(results["i2t_r1"]) < 100  # neither trivial


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_results_stay_on_the_gpu():
    metric = RetrievalRecallMetric().cuda()
    feats = F.normalize(torch.randn(4, 8, device="cuda"), dim=-1)
    ids = torch.arange(4, device="cuda")
    metric.update(feats, ids, feats, ids, ids)
    assert all(v.device.type == "cuda" for v in metric.compute().values())


def test_recall_at_1_5_10_and_their_mean_differ_on_ranked_lists():
    """Four queries whose first positive sits at rank 1, 3, 8 and nowhere: R@1, R@5, R@10 and
    the mean are four different numbers (mean_recall is the mean of the three, not one of them)."""
    ranked = torch.arange(10).repeat(4, 1)
    positives = torch.tensor([[0, -1], [2, 9], [7, -1], [-1, -1]])
    assert recall_at_k(ranked, positives) == {"r1": 25.0, "r5": 50.0, "r10": 75.0, "mean_recall": 50.0}


def test_the_metric_reports_the_mean_of_its_three_recalls():
    """Caption q ranks its image q-th (0-based) of 12: text->image R@1, R@5, R@10 are 1, 5 and 10
    of 12 queries; each direction's mean_recall is the mean of its three recalls."""
    n = 12
    images = torch.eye(n)
    texts = torch.zeros(n, n)
    for q in range(n):
        others = [i for i in range(n) if i != q]
        order = others[:q] + [q] + others[q:]
        texts[q, order] = 1 - 0.05 * torch.arange(n, dtype=torch.float32)
    metric = RetrievalRecallMetric()
    ids = torch.arange(n)
    metric.update(images, ids, F.normalize(texts, dim=-1), ids, ids)
    results = {k: float(v) for k, v in metric.compute().items()}
    assert [results[f"t2i_r{k}"] for k in (1, 5, 10)] == pytest.approx([100 / 12, 500 / 12, 1000 / 12])
    for short in ("t2i", "i2t"):
        recalls = [results[f"{short}_r{k}"] for k in (1, 5, 10)]
        assert results[f"{short}_mean_recall"] == pytest.approx(sum(recalls) / 3)
    six = [results[f"{s}_r{k}"] for s in ("t2i", "i2t") for k in (1, 5, 10)]
    assert results["rsum"] == pytest.approx(sum(six))


def test_positives_from_pairs_pads_with_minus_one_in_pair_order():
    """Pairs in any order: each query's items in the order the pairs came, padded with -1 to the
    widest query; a query without pairs is all -1; no pairs at all gives one column of -1."""
    queries = torch.tensor([2, 0, 2, 2, 0])
    items = torch.tensor([7, 3, 5, 9, 1])
    got = positives_from_pairs(queries, items, 4)
    assert got.dtype == torch.long
    assert got.tolist() == [[3, 1, -1], [-1, -1, -1], [7, 5, 9], [-1, -1, -1]]
    empty = torch.zeros(0, dtype=torch.long)
    assert positives_from_pairs(empty, empty, 2).tolist() == [[-1], [-1]]
    assert positives_from_pairs(empty, empty, 0).shape == (0, 1)
    # many ties: a stable sort keeps every query's items in pair order
    queries = torch.arange(300) % 3
    got = positives_from_pairs(queries, torch.arange(300), 3)
    assert got.tolist() == [list(range(q, 300, 3)) for q in range(3)]


def test_recall_of_a_single_query():
    got = recall_at_k(torch.tensor([[4, 2, 0]]), torch.tensor([[2]]), ks=(1, 2))
    assert got == {"r1": 0.0, "r2": 100.0, "mean_recall": 50.0}
