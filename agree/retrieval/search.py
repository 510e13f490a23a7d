"""Exact top-k similarity search, tiled so memory never scales with queries x gallery."""

from __future__ import annotations

import torch

_LOW_BITS = 32
_LOW_MASK = (1 << _LOW_BITS) - 1
_SIGN_FLIP = 0x7FFFFFFF


def _pack(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pack float32 scores and their gallery indices into unique int64 keys.

    A larger key means a higher score, or an equal score at a lower gallery index,
    so the largest keys are exactly the head of a stable descending sort.
    """
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    monotone = bits ^ ((bits >> 31) & _SIGN_FLIP)
    return (monotone << _LOW_BITS) | (_LOW_MASK - indices)


def _tile_topk(scores: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """Packed keys of the exact top-k of one score tile, under the lower-index tie rule.

    A plain float top-k is exact except in rows where the k-th score ties with scores
    that were left out; only those rows are redone on packed keys.
    """
    if k < scores.shape[1]:
        # one extra candidate: the best score left out; a row whose k-th score equals it has a tie
        # cut by the boundary (much cheaper than counting the scores >= the k-th one)
        values, indices = scores.topk(k + 1, dim=1)
        cut_ties = values[:, k] == values[:, k - 1]
        values, indices = values[:, :k], indices[:, :k]
    else:
        values, indices = scores.topk(k, dim=1)
        cut_ties = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    keys = _pack(values, indices + offset)
    if cut_ties.any():
        rows = cut_ties.nonzero().squeeze(1)
        all_indices = torch.arange(offset, offset + scores.shape[1], device=scores.device)
        keys[rows] = _pack(scores[rows], all_indices.expand(len(rows), -1)).topk(k, dim=1).values
    return keys


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert `_pack`: (float32 scores, int64 gallery indices)."""
    monotone = keys >> _LOW_BITS
    bits = (monotone ^ ((monotone >> 31) & _SIGN_FLIP)).to(torch.int32)
    return bits.view(torch.float32), _LOW_MASK - (keys & _LOW_MASK)


def topk_similarity(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    query_chunk: int = 4096,
    gallery_tile: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by dot product: (scores [Q,k], indices [Q,k] into gallery), best first.

    Scores are computed in float32 on the inputs' device, `query_chunk` queries against
    `gallery_tile` gallery rows at a time, keeping a running top-k per query, so peak
    memory is a few copies of one query_chunk x gallery_tile block (int64 ones for rows
    whose k-th score ties with a score left out). `k` is clamped to the gallery size.

    Ties are deterministic: equal scores come in increasing gallery index, so the result
    equals the first k columns of a stable descending sort of each full score row
    (-0.0 and 0.0 count as equal; NaN scores are not supported).
    """
    if queries.dim() != 2 or gallery.dim() != 2:
        raise ValueError(
            f"queries and gallery must be 2-D, got shapes {tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} differ in feature dimension"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if query_chunk < 1 or gallery_tile < 1:
        raise ValueError(f"query_chunk and gallery_tile must be >= 1, got {query_chunk} and {gallery_tile}")
    if gallery.shape[0] > _LOW_MASK:
        raise ValueError(f"gallery has {gallery.shape[0]} rows; at most {_LOW_MASK} are supported")

    k = min(k, gallery.shape[0])
    gallery = gallery.float()
    out_scores, out_indices = [], []
    for start in range(0, queries.shape[0], query_chunk):
        chunk = queries[start : start + query_chunk].float()
        best = chunk.new_empty((chunk.shape[0], 0), dtype=torch.int64)
        for offset in range(0, gallery.shape[0], gallery_tile):
            scores = chunk @ gallery[offset : offset + gallery_tile].T
            merged = torch.cat([best, _tile_topk(scores, offset, min(k, scores.shape[1]))], dim=1)
            best = merged.topk(min(k, merged.shape[1]), dim=1).values
        scores, indices = _decode_keys(best)
        out_scores.append(scores)
        out_indices.append(indices)
    if not out_scores:
        empty = queries.new_empty((0, k), dtype=torch.float32)
        return empty, empty.to(torch.int64)
    return torch.cat(out_scores), torch.cat(out_indices)
