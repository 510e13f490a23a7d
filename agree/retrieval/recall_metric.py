"""The validation metric: recall@K over embeddings accumulated across batches and ranks.

torchmetrics' ``RetrievalRecall`` computes another quantity (relevant-in-top-K over all relevant,
so image→text R@1 ≤ 0.2 with five captions per image) and loops over queries in Python, so
``RetrievalRecallMetric`` is a ``torchmetrics.Metric`` that only borrows its state handling
(accumulation, cross-rank concatenation) and computes recall with tensor ops. It lives apart
from ``agree.retrieval.metrics`` so that evaluation imports no torchmetrics.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from agree.retrieval.metrics import DIRECTIONS, KS, SHORT, positives_from_pairs, recall_at_k, summarise
from agree.retrieval.search import topk_both


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique ids, index of each one's first occurrence in ``ids``)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((len(unique),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
    return unique, first


class RetrievalRecallMetric(Metric):
    """Image↔text recall@1/5/10 over embeddings accumulated across batches and ranks.

    Each caption has one image; an image's positives are all its captions. Items that a
    ``DistributedSampler`` repeated to even out batches are counted once (by id).
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = KS, **kwargs):
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        for name in ("image_features", "image_ids", "text_features", "text_ids", "text_image_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_features: torch.Tensor,
        image_ids: torch.Tensor,
        text_features: torch.Tensor,
        text_ids: torch.Tensor,
        text_image_ids: torch.Tensor,
    ) -> None:
        self.image_features.append(image_features.float())
        self.image_ids.append(image_ids)
        self.text_features.append(text_features.float())
        self.text_ids.append(text_ids)
        self.text_image_ids.append(text_image_ids)

    def compute(self) -> dict[str, torch.Tensor]:
        """``t2i_r1`` ... ``i2t_mean_recall`` and ``rsum`` in percent, as float32 tensors (what
        Lightning logs) on the metric's device."""
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731
        image_ids, keep_images = _first_occurrence(cat(self.image_ids))
        _, keep_texts = _first_occurrence(cat(self.text_ids))
        images = cat(self.image_features)[keep_images]
        texts = cat(self.text_features)[keep_texts]
        text_image = torch.searchsorted(image_ids, cat(self.text_image_ids)[keep_texts])
        k = min(max(self.ks), len(images), len(texts))
        text_index = torch.arange(len(texts), device=texts.device)
        (_, t2i_lists), (_, i2t_lists) = topk_both(texts, images, k)
        t2i = recall_at_k(t2i_lists, text_image[:, None], self.ks)
        i2t_positives = positives_from_pairs(text_image, text_index, len(images))
        i2t = recall_at_k(i2t_lists, i2t_positives, self.ks)
        results = {}
        for direction, values in zip(DIRECTIONS, (t2i, i2t), strict=True):
            results.update({f"{SHORT[direction]}_{name}": value for name, value in values.items()})
        results["rsum"] = summarise(t2i, i2t)["rsum"]
        return {
            name: torch.tensor(value, dtype=torch.float32, device=texts.device)
            for name, value in results.items()
        }
