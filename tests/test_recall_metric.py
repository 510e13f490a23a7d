"""The validation metric against torchmetrics' hit rate (the recall papers report), as device tensors."""

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.retrieval import RetrievalHitRate

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
