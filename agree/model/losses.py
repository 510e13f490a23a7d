"""AGREE fine-tuning losses as pure functions of L2-normalised features (SPEC §1).

Multi-process training passes the features gathered from every rank as ``*_all`` and this
rank's offset into them: local rows are the queries, all rows are the candidates, as open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)``. We do not call ``ClipLoss`` itself because
the entity losses need padded slots and duplicate pairs masked out, which it cannot do.

Every loss is normalised by *global* counts and scaled by the rank's share (``N / n``), so the
mean over ranks that DDP's gradient averaging computes equals the single-process loss on the
whole global batch, however padding is spread over the ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rank_share(n: int, big_n: int) -> float:
    return big_n / n


def _candidates(rows: torch.Tensor, valid_all: torch.Tensor, keys_all: torch.Tensor | None) -> torch.Tensor:
    """[S, n, N] bool: the candidates of the query ``rows`` (indices into the N gathered rows):
    valid ones (valid_all: [S, N]) that are not another positive (keys_all: [S, N, K], a key
    shared with the query; None: every valid row)."""
    keep = valid_all[:, None, :].expand(-1, len(rows), -1)
    if keys_all is not None:
        same = (keys_all[:, rows, None, :] == keys_all[:, None, :, :]).any(-1)
        cols = torch.arange(valid_all.shape[-1], device=rows.device)
        keep = keep & (~same | (rows[:, None] == cols[None, :]))
    return keep


def _info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    offset: int,
    valid_all: torch.Tensor,
    keys_all: torch.Tensor | None,
) -> torch.Tensor:
    """Symmetric InfoNCE of S sets of pairs at once: [S] losses, each normalised as ``contrastive_loss``.

    a, b: [S, n, D]; a_all, b_all: [S, N, D] (a leading 1 broadcasts); valid_all: [S, N] bool;
    keys_all: [S, N, K] or None. Padding is masked, never indexed out: the graph, and so the
    collectives of its backward, is the same on every rank whatever its data, and no value is read
    on the host.
    """
    n, big_n = a.shape[-2], a_all.shape[-2]
    rows = torch.arange(offset, offset + n, device=a.device)
    valid = valid_all[:, rows]  # [S, n]
    # a padding query's terms (weight 0) stay finite
    keep = _candidates(rows, valid_all, keys_all) | ~valid[..., None]
    blocked = torch.zeros(keep.shape, device=a.device).masked_fill(~keep, float("-inf"))
    labels = rows.expand(valid.shape).reshape(-1)
    total = 0.0
    for x, y_all in ((a, b_all), (b, a_all)):
        logits = logit_scale * x @ y_all.transpose(-1, -2) + blocked  # [S, n, N]
        terms = F.cross_entropy(logits.flatten(0, 1), labels, reduction="none").view(valid.shape)
        total = total + (terms * valid).sum(-1)
    count = valid_all.sum(-1).clamp(min=1)  # none valid: 0, with a graph
    return total / (2 * count) * _rank_share(n, big_n)


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    a_all: torch.Tensor | None = None,
    b_all: torch.Tensor | None = None,
    offset: int = 0,
    valid_all: torch.Tensor | None = None,
    keys_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` matches row i of ``b``.

    a, b: [n, D] local features; a_all, b_all: [N, D] features of every rank (default: a, b);
    offset: index of this rank's first row in the ``*_all`` tensors; valid_all: [N] bool, rows
    that take part (padding is neither a query nor a candidate); keys_all: [N] or [N, K] int ids
    (e.g. image id, text hash): a candidate sharing any key with the query's own pair is another
    positive, so it is left out of the negatives (five captions of one image, one VG word drawn
    twice). Returns the mean over valid queries of both directions, or 0 (with a graph through
    every input) when there are none.
    """
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    big_n = a_all.shape[0]
    if valid_all is None:
        valid_all = torch.ones(big_n, dtype=torch.bool, device=a.device)
    keys = None if keys_all is None else keys_all.reshape(1, big_n, -1)
    one_set = _info_nce(
        a[None], b[None], logit_scale, a_all[None], b_all[None], offset, valid_all[None], keys
    )
    return one_set[0]


def slot_contrastive_loss(
    image: torch.Tensor,
    slots: torch.Tensor,
    logit_scale: torch.Tensor,
    valid_all: torch.Tensor,
    image_all: torch.Tensor | None = None,
    slots_all: torch.Tensor | None = None,
    offset: int = 0,
    keys_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """The prompt loss: image ↔ its j-th entity prompt, InfoNCE per slot, mean over used slots.

    slots: [n, E, D] local prompt features (padding rows arbitrary); valid_all: [N, E] bool;
    keys_all: [N, E, K] int ids per slot (see ``contrastive_loss``). Every slot is computed in one
    batched product, an unused one (no valid row on any rank) weighted 0.
    """
    image_all = image if image_all is None else image_all
    slots_all = slots if slots_all is None else slots_all
    big_n, slots_n = valid_all.shape
    keys = None if keys_all is None else keys_all.reshape(big_n, slots_n, -1).transpose(0, 1)
    per_slot = _info_nce(
        image[None],
        slots.transpose(0, 1),
        logit_scale,
        image_all[None],
        slots_all.transpose(0, 1),
        offset,
        valid_all.T,
        keys,
    )
    used = valid_all.any(0)
    return (per_slot * used).sum() / used.sum().clamp(min=1)


def swap_negatives_loss(
    image: torch.Tensor,
    caption_all: torch.Tensor,
    swap: torch.Tensor,
    has_swap: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
    has_swap_all: torch.Tensor | None = None,
    keys_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image→text InfoNCE with a swapped caption among each image's negatives (NegCLIP).

    image: [n, D] local image features; caption_all: [N, D] the captions of every rank (row
    ``offset + i`` is image i's); swap: [n, D] image i's own swapped caption (rows without one
    arbitrary); has_swap: [n] bool, the images that have a swap: only they are queries;
    has_swap_all: [N] bool, the same for every rank (the count normalises; default has_swap);
    keys_all: as ``contrastive_loss``. Image i scores its caption against every caption of the
    global batch and its own swap. Returns the mean over the global batch's images with a swap
    (times the rank's share), or 0 with a graph when there are none.
    """
    n, big_n = image.shape[0], caption_all.shape[0]
    has_swap_all = has_swap if has_swap_all is None else has_swap_all
    rows = torch.arange(offset, offset + n, device=image.device)
    every = torch.ones(1, big_n, dtype=torch.bool, device=image.device)
    keep = _candidates(rows, every, None if keys_all is None else keys_all.reshape(1, big_n, -1))[0]
    blocked = torch.zeros(keep.shape, device=image.device).masked_fill(~keep, float("-inf"))
    logits = logit_scale * image @ caption_all.T + blocked
    own_swap = logit_scale * (image * swap).sum(-1, keepdim=True)
    terms = F.cross_entropy(torch.cat([logits, own_swap], 1), rows, reduction="none")
    # rows without a swap are masked, never indexed out: the same graph (and collectives) on every rank
    total = torch.where(has_swap, terms, torch.zeros_like(terms)).sum()
    return total / has_swap_all.sum().clamp(min=1) * _rank_share(n, big_n)


def margin_ranking_loss(
    positive: torch.Tensor,
    negative: torch.Tensor,
    logit_scale: torch.Tensor,
    margin: float = 0.0,
    valid: torch.Tensor | None = None,
    global_size: int | None = None,
    gradient: bool = True,
    global_pairs: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``Σ max(0, margin − τ·(pos − neg)) / τ`` over the local rows (and slots), as the reference.

    positive: [n] or [n, E] (broadcast against negative); negative: [n] or [n, E] similarities;
    valid: mask of the pairs that count; global_size: rows of the whole global batch (for the
    rank share, default n). ``gradient=False`` is the release's defect: the hinge is rebuilt from
    Python floats, so only the division by τ reaches the logit scale. ``global_pairs``: the pairs
    that count in the whole global batch; given, the sum is divided by it (the mean over pairs,
    ``loss_options.margin_reduction=mean``; 0 pairs give 0).
    """
    if positive.dim() < negative.dim():
        positive = positive[:, None]
    hinge = F.relu(margin - logit_scale * (positive - negative))
    hinge = (hinge if gradient else hinge.detach()) / logit_scale
    if valid is not None:
        hinge = hinge * valid
    n = negative.shape[0]
    total = hinge.sum() * _rank_share(n, global_size or n)
    return total if global_pairs is None else total / max(int(global_pairs), 1)
