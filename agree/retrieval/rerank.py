"""Re-rankers over top-k candidate lists: TBR (bi-directional ranks) and EGR (textual entities).

Every function is vectorised over queries and processes them in chunks to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from agree.progress import progress  # a bar on a terminal only
from agree.retrieval.search import _decode_keys, _pack, topk_similarity

# TBR gathers [chunk, k, kb] backward entries: at most 4M elements (about 70 MB with the masks).
_TBR_ELEMENTS = 1 << 22
# Text->image EGR scores [chunk, 2, G] entity sums against the gallery: 4M float32 = 16 MB.
_T2I_ELEMENTS = 1 << 22
# Image->text EGR: queries per chunk (pair scores of one chunk: 4096 x 128 x 11 float32 = 23 MB) ...
_I2T_CHUNK = 4096
# ... and at most this many gathered query rows plus feature rows per gallery bucket
# (2048 x 768 float32 = 6 MB; staying small lets the allocator reuse the blocks).
_PAIR_ROWS = 2048
# EGR in the release's arithmetic: queries per chunk (gathered candidates: 64 x 128 x 768 float32 = 25 MB).
_RELEASE_CHUNK = 64

# EGR's arithmetic (``rerank.accumulate``): float32, vectorised over entity sums; float64, the
# release's per-pair sums in float64 of products taken one query row at a time.
ACCUMULATE = ("float32", "float64")


def tbr(forward: torch.Tensor, backward: torch.Tensor, *, absent_rank: int = 10000) -> torch.Tensor:
    """Text-image bi-directional re-ranking of forward top-k lists.

    `forward[q]` lists gallery indices best first (-1 pads short lists); `backward[g]` lists
    query indices for gallery item g, best first (-1 pads). Ranks are 0-based. A query whose
    forward top-1 lists it at position 0 keeps its list; any other list is stably sorted by
    forward_rank + backward_rank ascending (the same order as their mean), backward_rank being
    q's first position in `backward[p]`, or `absent_rank` when q is not in it, so ties keep
    forward order. Padding stays at the end.
    """
    if forward.dim() != 2 or backward.dim() != 2:
        raise ValueError(
            f"forward and backward must be 2-D, got shapes {tuple(forward.shape)} and {tuple(backward.shape)}"
        )
    if backward.shape[1] < 1:
        raise ValueError(f"backward lists must have at least one entry, got shape {tuple(backward.shape)}")
    k, kb = forward.shape[1], backward.shape[1]
    device = forward.device
    forward_rank = torch.arange(k, device=device)
    backward_pos = torch.arange(kb, device=device)
    padded = torch.iinfo(torch.int64).max
    chunk = max(1, _TBR_ELEMENTS // max(1, k * kb))
    out = []
    for start in progress(range(0, forward.shape[0], chunk), "TBR"):
        lists = forward[start : start + chunk]
        query = torch.arange(start, start + lists.shape[0], device=device)[:, None]
        present = lists >= 0
        back = backward[lists.clamp(min=0)]  # [c, k, kb]
        hit = back == query[:, :, None]
        first_hit = torch.where(hit, backward_pos, kb).amin(dim=2)
        backward_rank = torch.where(first_hit < kb, first_hit, absent_rank)
        key = torch.where(present, forward_rank + backward_rank, padded)
        keep = present[:, 0] & hit[:, 0, 0]
        key = torch.where(keep[:, None], forward_rank, key)
        order = torch.sort(key, dim=1, stable=True).indices
        out.append(lists.gather(1, order))
    if not out:
        return forward.clone()
    return torch.cat(out)


def _rank_candidates(candidates: torch.Tensor, keys: list[torch.Tensor], k: int) -> torch.Tensor:
    """Stable-sort each candidate row by every key in turn, descending; keep the first k.

    Sorting by the keys one after another ties each sort back to the order before it.
    """
    order = torch.arange(candidates.shape[1], device=candidates.device).expand_as(candidates)
    for key in keys:
        perm = torch.sort(key.gather(1, order), dim=1, descending=True, stable=True).indices
        order = order.gather(1, perm)
    return candidates.gather(1, order[:, :k])


def _valid_sum(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum of the valid entity vectors of [N, E, D] features: [N, D] float32.

    Padded slots are multiplied by zero, which gives exact zeros for any finite content.
    """
    return torch.bmm(valid[:, None, :].float(), features.float()).squeeze(1)


def _candidates(
    queries: torch.Tensor, gallery: torch.Tensor, depth: int, search: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``depth`` (scores, indices) per query: from ``search`` when given (at least that deep)."""
    if search is None:
        return topk_similarity(queries, gallery, depth)
    depth = min(depth, gallery.shape[0])
    if search[1].shape != (queries.shape[0], search[1].shape[1]) or search[1].shape[1] < depth:
        raise ValueError(
            f"search results of shape {tuple(search[1].shape)} hold fewer than {depth} candidates per query"
        )
    return search[0][:, :depth], search[1][:, :depth]


def _check_egr_inputs(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    prompts: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor,
    entity_rows: int,
    k: int,
    depth: int,
) -> None:
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"expected [Q, D] and [G, D] features, got {tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    entity_shape = (entity_rows, valid.shape[1] if valid.dim() == 2 else -1, queries.shape[1])
    if valid.dim() != 2 or valid.shape[0] != entity_rows or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool [{entity_rows}, E] tensor, got {valid.dtype} {tuple(valid.shape)}"
        )
    if tuple(prompts.shape) != entity_shape or tuple(masks.shape) != entity_shape:
        raise ValueError(
            f"prompts and masks must have shape {entity_shape}, "
            f"got {tuple(prompts.shape)} and {tuple(masks.shape)}"
        )
    if k < 1 or depth < 1:
        raise ValueError(f"k and depth must be >= 1, got {k} and {depth}")


def egr_text_to_image(
    texts: torch.Tensor,
    images: torch.Tensor,
    prompts: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor,
    k: int,
    depth: int = 128,
    *,
    raw_weight: float = 0.9,
    mask_weight: float = 0.1,
    base_weight: float = 0.99,
    prompt_weight: float = 0.01,
    search: tuple[torch.Tensor, torch.Tensor] | None = None,
    accumulate: str = "float32",
) -> torch.Tensor:
    """Entity-guided re-ranking of caption queries over images: [Q, min(k, depth, G)] image indices.

    texts [Q, D], images [G, D]; prompts / masks [Q, E, D] hold each caption's entity-prompt and
    entity-masked-caption features, `valid` [Q, E] marks real slots (padded slots may hold any
    finite values and never contribute). For the top-`depth` images v by s(t, v):
        base  = raw_weight * s(t, v) + mask_weight * sum_{valid j} (s(t, v) - s(m_j, v))
        score = base_weight * base + prompt_weight * mean_{valid j} s(e_j, v)
    Candidates start in search order (score descending, lower index first), are stably sorted
    by base, then by score, both descending. A caption without valid entities has a zero mask
    sum and a mean term of 0, so it keeps its search order.

    Both entity terms are linear in the entity features, so each caption's valid mask and
    prompt vectors are summed first; the two sums are scored against the whole gallery with
    one matrix product per query chunk (about twice the cost of the search itself), which on
    CPU is much cheaper than gathering `depth` candidate vectors per caption.

    ``accumulate="float64"`` scores as the release does instead (``_release_egr``; `search` is
    not used).
    """
    _check_egr_inputs(texts, images, prompts, masks, valid, texts.shape[0], k, depth)
    if accumulate == "float64":
        weights = (raw_weight, mask_weight, base_weight, prompt_weight)
        return _release_egr(texts, images, prompts, masks, valid, k, depth, _release_t2i(*weights), True)
    raw, candidates = _candidates(texts, images, depth, search)
    images = images.float()
    chunk = max(1, _T2I_ELEMENTS // max(1, 2 * images.shape[0]))
    out = []
    for start in progress(range(0, texts.shape[0], chunk), "EGR text->image"):
        stop = start + chunk
        chunk_valid = valid[start:stop]
        sums = torch.cat(
            [_valid_sum(masks[start:stop], chunk_valid), _valid_sum(prompts[start:stop], chunk_valid)]
        )
        dense = (sums @ images.T).view(2, chunk_valid.shape[0], images.shape[0])
        picked = candidates[start:stop]
        mask_scores, prompt_scores = dense.gather(2, picked.expand(2, -1, -1)).unbind(0)
        chunk_raw = raw[start:stop]
        count = chunk_valid.sum(dim=1, keepdim=True)
        base = raw_weight * chunk_raw + mask_weight * (count * chunk_raw - mask_scores)
        score = base_weight * base + prompt_weight * prompt_scores / count.clamp(min=1)
        out.append(_rank_candidates(candidates[start:stop], [base, score], k))
    if not out:
        return candidates[:, :k]
    return torch.cat(out)


def _pair_scores(
    queries: torch.Tensor, candidates: torch.Tensor, gallery_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Dot products of each query with every feature vector of each of its candidates.

    queries [Q, D] float32, candidates [Q, n] gallery indices, `gallery_features` a sequence of
    [G, F_i, D] tensors. Returns [Q, n, sum F_i] float32. Query-candidate pairs are grouped by
    gallery item, so each item's features are read once and multiplied with all the queries
    that picked it; items are batched in decreasing pair count so padding stays small.
    """
    n_queries, n = candidates.shape
    device = queries.device
    n_features = sum(features.shape[1] for features in gallery_features)
    flat = candidates.reshape(-1)
    counts = torch.bincount(flat, minlength=gallery_features[0].shape[0])
    items = torch.argsort(counts, descending=True, stable=True)
    items = items[: int((counts > 0).sum())]
    item_counts = counts[items]
    slot = torch.empty_like(counts)
    slot[items] = torch.arange(len(items), device=device)
    pair_slot, pair_order = torch.sort(slot[flat], stable=True)
    slot_start = torch.cumsum(item_counts, 0) - item_counts
    pair_pos = torch.arange(flat.numel(), device=device) - slot_start[pair_slot]
    pair_query = pair_order // n

    results = queries.new_empty((flat.numel(), n_features))
    counts_list = item_counts.tolist()
    starts_list = slot_start.tolist() + [flat.numel()]
    first = 0
    while first < len(items):
        width = counts_list[first]
        n_items = max(1, _PAIR_ROWS // (width + n_features))
        last = min(first + n_items, len(items))
        lo, hi = starts_list[first], starts_list[last]
        rows, cols = pair_slot[lo:hi] - first, pair_pos[lo:hi]
        grid = torch.zeros(last - first, width, dtype=torch.int64, device=device)
        grid[rows, cols] = pair_query[lo:hi]
        gathered = queries[grid]  # [items, width, D]
        bucket = items[first:last]
        block = torch.cat(
            [torch.bmm(gathered, features[bucket].float().transpose(1, 2)) for features in gallery_features],
            dim=2,
        )
        results[pair_order[lo:hi]] = block[rows, cols]
        first = last
    return results.view(n_queries, n, n_features)


def egr_image_to_text(
    images: torch.Tensor,
    texts: torch.Tensor,
    prompts: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor,
    k: int,
    depth: int = 128,
    *,
    raw_weight: float = 0.8,
    prompt_weight: float = 0.2,
    base_weight: float = 0.98,
    mask_weight: float = 0.02,
    search: tuple[torch.Tensor, torch.Tensor] | None = None,
    accumulate: str = "float32",
) -> torch.Tensor:
    """Entity-guided re-ranking of image queries over captions: [Q, min(k, depth, G)] caption indices.

    images [Q, D], texts [G, D]; prompts / masks [G, E, D] hold each caption's entity-prompt and
    entity-masked-caption features, `valid` [G, E] marks real slots (padded slots may hold any
    finite values and never contribute). For the top-`depth` captions t by s(v, t):
        base  = raw_weight * s(v, t) + prompt_weight * mean_{valid j} s(v, e_j)
        score = base_weight * base + mask_weight * sum_{valid j} min(0, s(v, t) - s(v, m_j))
    Candidates start in search order (score descending, lower index first), are stably sorted
    by base, then by score, both descending. A caption without valid entities gets a mean term
    of 0 and a zero mask sum. The prompt sum is linear in the features, so it is taken over each
    caption's prompt vectors first and dotted with the image.

    ``accumulate="float64"`` scores as the release does instead (``_release_egr``; `search` is
    not used).
    """
    _check_egr_inputs(images, texts, prompts, masks, valid, texts.shape[0], k, depth)
    if accumulate == "float64":
        weights = (raw_weight, prompt_weight, base_weight, mask_weight)
        return _release_egr(images, texts, prompts, masks, valid, k, depth, _release_i2t(*weights), False)
    all_raw, all_candidates = _candidates(images, texts, depth, search)
    prompt_sums = _valid_sum(prompts, valid)
    counts = valid.sum(dim=1).clamp(min=1)
    n_entities = valid.shape[1]
    out = []
    for start in progress(range(0, images.shape[0], _I2T_CHUNK), "EGR image->text"):
        stop = start + _I2T_CHUNK
        raw, candidates = all_raw[start:stop], all_candidates[start:stop]
        queries = images[start:stop].float()
        scores = _pair_scores(queries, candidates, [masks, prompt_sums[:, None]])
        base = raw_weight * raw + prompt_weight * scores[..., n_entities] / counts[candidates]
        drops = (raw[..., None] - scores[..., :n_entities]).clamp(max=0)
        penalty = torch.where(valid[candidates], drops, 0.0).sum(dim=2)
        score = base_weight * base + mask_weight * penalty
        out.append(_rank_candidates(candidates, [base, score], k))
    if not out:
        return all_candidates[:, :k]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# EGR in the release's arithmetic (make_topk_predictions_mask+prompt.py): every similarity is a
# float32 product of one query row with the gallery, as its per-query loops take them (BLAS rounds
# a [1, D] x [D, n] product differently from a matrix product in the last bits), and the scores
# are Python-float (float64) sums over the entity slots in slot order.

Combine = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def _slot_sum(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ over the valid slots of values [..., E], added left to right as Python's ``sum`` and
    numpy's mean over the first axis do (a vectorised sum adds in another order)."""
    total = torch.zeros(values.shape[:-1], dtype=values.dtype, device=values.device)
    for j in range(values.shape[-1]):
        total = total + torch.where(valid[..., j], values[..., j], 0.0)
    return total


def _release_t2i(raw_weight: float, mask_weight: float, base_weight: float, prompt_weight: float) -> Combine:
    def combine(raw, mask_scores, prompt_scores, valid):
        base = raw_weight * raw + mask_weight * _slot_sum(raw[..., None] - mask_scores, valid)
        mean = _slot_sum(prompt_scores, valid) / valid.sum(-1).clamp(min=1)
        return base, base_weight * base + prompt_weight * mean

    return combine


def _release_i2t(raw_weight: float, prompt_weight: float, base_weight: float, mask_weight: float) -> Combine:
    def combine(raw, mask_scores, prompt_scores, valid):
        mean = _slot_sum(prompt_scores, valid) / valid.sum(-1).clamp(min=1)
        base = raw_weight * raw + prompt_weight * mean
        penalty = _slot_sum((raw[..., None] - mask_scores).clamp(max=0), valid)
        return base, base_weight * base + mask_weight * penalty

    return combine


def _row_products(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """rows [c, 1, D] times columns [c, n, D]: [c, n] float32, one [1, D] x [D, n] product per row
    (the release's shape and layout; a batched product takes about three times as long on a CPU)."""
    return torch.cat([row @ cols.T for row, cols in zip(rows, columns, strict=True)])


def _release_search(
    queries: torch.Tensor, gallery: torch.Tensor, depth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``depth`` (float32 scores, indices) of each of a few queries: the gallery times the query
    vector (a matrix-vector product, rounded as the release's one-query products), best first, ties
    in gallery order as Python's stable ``sorted`` (the search's packed keys: score, then index)."""
    scores = torch.stack([gallery @ q for q in queries])
    keys = _pack(scores, torch.arange(scores.shape[1], device=scores.device).expand_as(scores))
    return _decode_keys(keys.topk(depth, dim=1).values)


def _release_egr(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    prompts: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor,
    k: int,
    depth: int,
    combine: Combine,
    query_entities: bool,
) -> torch.Tensor:
    """EGR with the release's arithmetic, in either direction: [Q, min(k, depth, G)] gallery indices.

    ``query_entities``: the entity features [Q, E, D] belong to the queries (text→image: each entity
    vector of the caption times the candidate images); else [G, E, D] to the gallery (image→text:
    the image times each entity vector of the candidate captions). ``combine(raw, mask_scores,
    prompt_scores, valid)`` turns float64 [c, n] and [c, n, E] scores into (base, final) [c, n].
    Each query scores the whole gallery once, so this costs about one matrix-vector product per query.
    """
    queries, gallery = queries.float(), gallery.float()
    depth, slots = min(depth, gallery.shape[0]), range(valid.shape[1])

    def rank_chunk(start: int) -> torch.Tensor:
        chunk = slice(start, start + _RELEASE_CHUNK)
        raw, picked = _release_search(queries[chunk], gallery, depth)
        candidates = gallery[picked] if query_entities else None
        scores = []
        for features in (masks, prompts):
            if query_entities:
                products = [_row_products(features[chunk, j, None].float(), candidates) for j in slots]
            else:
                products = [_row_products(queries[chunk, None], features[picked, j].float()) for j in slots]
            scores.append(torch.stack(products, dim=-1).double())
        slot_valid = valid[chunk, None] if query_entities else valid[picked]
        base, final = combine(raw.double(), *scores, slot_valid)
        return _rank_candidates(picked, [base, final], k)

    # one chunk a thread: the one-row products are too small for torch's own threads, and they
    # release the GIL (threads, not processes: nothing outlives the command)
    starts = range(0, queries.shape[0], _RELEASE_CHUNK)
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        out = list(progress(pool.map(rank_chunk, starts), "EGR (release arithmetic)", total=len(starts)))
    if not out:
        return torch.zeros(0, min(k, depth), dtype=torch.int64, device=queries.device)
    return torch.cat(out)
