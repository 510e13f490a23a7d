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
    keep = valid_all[None, :].expand(n, big_n)
    if keys_all is not None:
        keys_all = keys_all.reshape(big_n, -1)
        same = (keys_all[rows][:, None, :] == keys_all[None, :, :]).any(-1)
        keep = keep & (~same | (rows[:, None] == torch.arange(big_n, device=a.device)[None, :]))
    blocked = torch.zeros(n, big_n, device=a.device).masked_fill(~keep, float("-inf"))
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
