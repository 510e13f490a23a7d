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


def _blocked_candidates(
    rows: torch.Tensor, valid_all: torch.Tensor, keys_all: torch.Tensor | None
) -> torch.Tensor:
    """[n, N] logit offsets: 0 for the candidates of query rows ``rows`` (indices into the N
    gathered rows), -inf for padding and for another positive (a key shared with the query)."""
    big_n = len(valid_all)
    keep = valid_all[None, :].expand(len(rows), big_n)
    if keys_all is not None:
        keys_all = keys_all.reshape(big_n, -1)
        same = (keys_all[rows][:, None, :] == keys_all[None, :, :]).any(-1)
        keep = keep & (~same | (rows[:, None] == torch.arange(big_n, device=rows.device)[None, :]))
    return torch.zeros(keep.shape, device=rows.device).masked_fill(~keep, float("-inf"))


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
    twice). Returns the mean over valid queries of both directions, or 0 (with a graph) when
    there are none.
    """
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    n, big_n = a.shape[0], a_all.shape[0]
    rows = torch.arange(offset, offset + n, device=a.device)
    if valid_all is None:
        valid_all = torch.ones(big_n, dtype=torch.bool, device=a.device)
    blocked = _blocked_candidates(rows, valid_all, keys_all)
    valid = valid_all[rows]
    count = valid_all.sum()
    if not valid.any():
        return (a.sum() + b.sum()) * 0.0
    logits_ab = (logit_scale * a @ b_all.T + blocked)[valid]
    logits_ba = (logit_scale * b @ a_all.T + blocked)[valid]
    labels = rows[valid]
    total = F.cross_entropy(logits_ab, labels, reduction="sum") + F.cross_entropy(
        logits_ba, labels, reduction="sum"
    )
    return total / (2 * count) * _rank_share(n, big_n)


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
    keys_all: [N, E, K] int ids per slot (see ``contrastive_loss``).
    """
    image_all = image if image_all is None else image_all
    slots_all = slots if slots_all is None else slots_all
    used = [j for j in range(valid_all.shape[1]) if bool(valid_all[:, j].any())]
    if not used:
        return (image.sum() + slots.sum()) * 0.0
    losses = [
        contrastive_loss(
            image,
            slots[:, j],
            logit_scale,
            image_all,
            slots_all[:, j],
            offset,
            valid_all[:, j],
            None if keys_all is None else keys_all[:, j],
        )
        for j in used
    ]
    return torch.stack(losses).mean()


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
    count = has_swap_all.sum()
    if not has_swap.any():
        return (image.sum() + swap.sum() + caption_all.sum()) * 0.0
    rows = torch.arange(offset, offset + n, device=image.device)
    every = torch.ones(big_n, dtype=torch.bool, device=image.device)
    logits = logit_scale * image @ caption_all.T + _blocked_candidates(rows, every, keys_all)
    own_swap = logit_scale * (image * swap).sum(-1, keepdim=True)
    logits = torch.cat([logits, own_swap], 1)[has_swap]
    total = F.cross_entropy(logits, rows[has_swap], reduction="sum")
    return total / count * _rank_share(n, big_n)


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
