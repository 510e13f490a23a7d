"""Recall@K as papers report it: a query scores at K if *any* of its positives is in its top K.

Pure tensor functions; the validation metric built on them is ``agree.retrieval.recall_metric``.
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)
# The two directions, named explicitly (results.json's keys), and their short names (val/t2i_r1, "T2I").
DIRECTIONS = ("text_to_image", "image_to_text")
SHORT = {"text_to_image": "t2i", "image_to_text": "i2t"}


def positives_from_pairs(
    query_index: torch.Tensor, item_index: torch.Tensor, num_queries: int
) -> torch.Tensor:
    """Padded positives [Q, P] (-1 = none) from relevant (query, item) pairs."""
    order = torch.argsort(query_index, stable=True)
    query_index, item_index = query_index[order], item_index[order]
    counts = torch.bincount(query_index, minlength=num_queries)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(query_index), device=query_index.device) - starts[query_index]
    width = int(counts.max()) if len(counts) else 0
    positives = torch.full((num_queries, max(width, 1)), -1, dtype=torch.long, device=query_index.device)
    positives[query_index, slot] = item_index
    return positives


def recall_at_k(ranked: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K in percent and their mean, from ranked item indices [Q, K'] and positives [Q, P].

    Queries without any positive count as misses (they are a data error upstream). Lists shorter
    than K (a gallery smaller than K) count in full. Values come from integer hit counts in
    float64 (313 hits of 500 queries: 62.6, not a float32 mean's 62.59999871).
    """
    hits = (ranked[:, :, None] == positives[:, None, :]).logical_and(positives[:, None, :] >= 0).any(-1)
    first_hits = hits.cumsum(1).clamp(max=1)
    counts = {k: int(first_hits[:, min(k, ranked.shape[1]) - 1].sum()) for k in ks}
    n = max(1, ranked.shape[0])
    out = {f"r{k}": 100.0 * count / n for k, count in counts.items()}
    out["mean_recall"] = 100.0 * sum(counts.values()) / (n * len(ks))
    return out


def summarise(text_to_image: dict[str, float], image_to_text: dict[str, float]) -> dict:
    """The results block: recalls per direction and RSUM (the sum of the six recalls)."""
    blocks = dict(zip(DIRECTIONS, (text_to_image, image_to_text), strict=True))
    rsum = sum(v for d in blocks.values() for k, v in d.items() if k != "mean_recall")
    return {**blocks, "rsum": rsum}
