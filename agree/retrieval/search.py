"""Exact top-k similarity search, tiled so memory never scales with queries x gallery."""

from __future__ import annotations

import torch

from agree.progress import progress  # a bar on a terminal only

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


def _check_inputs(queries: torch.Tensor, gallery: torch.Tensor, ks: tuple[int, ...], tiles: tuple[int, int]):
    if queries.dim() != 2 or gallery.dim() != 2:
        raise ValueError(
            f"queries and gallery must be 2-D, got shapes {tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} differ in feature dimension"
        )
    if min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {min(ks)}")
    if min(tiles) < 1:
        raise ValueError(f"query_chunk and gallery_tile must be >= 1, got {tiles[0]} and {tiles[1]}")
    for name, rows in (("queries", queries.shape[0]), ("gallery", gallery.shape[0])):
        if rows > _LOW_MASK:
            raise ValueError(f"{name} has {rows} rows; at most {_LOW_MASK} are supported")


def _merge(best: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The largest ``best.shape[1]`` keys per row of two key blocks of the same rows."""
    return torch.cat([best, new], dim=1).topk(best.shape[1], dim=1).values


def _update_columns(running: torch.Tensor, scores: torch.Tensor, start: int, full: bool) -> torch.Tensor:
    """Merge a score tile's columns into their running top lists ([tile, kb] keys of query rows).

    Once every list is ``full`` (it has seen at least kb earlier queries), only scores above a
    column's current kb-th score can enter it: a later query with an equal score has a higher
    index and loses the tie. Those few scores are gathered per column instead of taking a top-k
    down every column of the tile, which needs a strided pass or a transposed copy; when there are
    too many of them (adversarial orders), the whole tile is ranked.
    """
    k = min(running.shape[1], scores.shape[0])
    if full:
        hit = scores > _decode_keys(running[:, -1])[0]
        rows, cols = hit.nonzero().unbind(1)
        if len(rows) * 8 <= scores.numel():
            cols, order = torch.sort(cols, stable=True)
            keys = _pack(scores[rows[order], cols], rows[order] + start)
            columns, counts = torch.unique_consecutive(cols, return_counts=True)
            first = torch.cumsum(counts, 0) - counts
            slot = torch.repeat_interleave(torch.arange(len(columns), device=cols.device), counts)
            grid = torch.full(
                (len(columns), int(counts.max()) if len(counts) else 0),
                torch.iinfo(torch.int64).min,
                dtype=torch.int64,
                device=scores.device,
            )
            grid[slot, torch.arange(len(cols), device=cols.device) - first[slot]] = keys
            running[columns] = _merge(running[columns], grid)
            return running
    return _merge(running, _tile_topk(scores.T, start, k))


def _search_keys(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, k_back: int, query_chunk: int, gallery_tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed top-k keys per query [Q, k] and top-``k_back`` keys per gallery row [G, k_back].

    One pass over the score tiles: each tile feeds the running top-k of its query rows and, when
    ``k_back`` > 0, the running top-``k_back`` of its gallery columns (whose candidates are query
    indices). Both are clamped to the other side's size. Running lists start filled with the
    smallest int64, below every packed key, so they fill up from real candidates.
    """
    k, k_back = min(k, gallery.shape[0]), min(k_back, queries.shape[0])
    gallery = gallery.float()
    empty = torch.iinfo(torch.int64).min
    forward = torch.full((queries.shape[0], k), empty, dtype=torch.int64, device=queries.device)
    backward = torch.full((gallery.shape[0], k_back), empty, dtype=torch.int64, device=queries.device)
    for start in progress(range(0, queries.shape[0], query_chunk), "search"):
        chunk = queries[start : start + query_chunk].float()
        best = forward[start : start + query_chunk]
        for offset in range(0, gallery.shape[0], gallery_tile):
            scores = chunk @ gallery[offset : offset + gallery_tile].T
            best = _merge(best, _tile_topk(scores, offset, min(k, scores.shape[1])))
            if k_back:
                rows = slice(offset, offset + gallery_tile)
                backward[rows] = _update_columns(backward[rows], scores, start, full=start >= k_back)
        forward[start : start + query_chunk] = best
    return forward, backward


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
    _check_inputs(queries, gallery, (k,), (query_chunk, gallery_tile))
    return _decode_keys(_search_keys(queries, gallery, k, 0, query_chunk, gallery_tile)[0])


def topk_both(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    k_back: int | None = None,
    query_chunk: int = 4096,
    gallery_tile: int = 65536,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Both directions' exact top-k from one pass over the score tiles.

    Returns ``topk_similarity(queries, gallery, k)`` and ``topk_similarity(gallery, queries,
    k_back)`` (``k_back`` defaults to ``k``), with the same tie rule in each direction (equal
    scores in increasing index), at the cost of one similarity computation instead of two.
    Scores come from ``queries @ gallery.T`` in both directions (a BLAS may round the reverse
    product differently in the last bit, so near-ties can order differently from a separate
    ``gallery @ queries.T`` search; exact ties never do).
    Memory: the per-direction search's tile blocks plus the [G, k_back] running lists.
    """
    k_back = k if k_back is None else k_back
    _check_inputs(queries, gallery, (k, k_back), (query_chunk, gallery_tile))
    forward, backward = _search_keys(queries, gallery, k, k_back, query_chunk, gallery_tile)
    return _decode_keys(forward), _decode_keys(backward)
