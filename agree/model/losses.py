"""AGREE fine-tuning losses as pure functions of L2-normalised features (SPEC §1).

Multi-process training passes the features gathered from every rank as ``*_all`` and this
rank's offset into them: local rows are the queries, all rows are the candidates, as open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)``. We do not call ``ClipLoss`` itself because
the entity losses need padded slots masked out of the candidates, which it cannot do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    a_all: torch.Tensor | None = None,
    b_all: torch.Tensor | None = None,
    offset: int = 0,
    valid_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` matches row i of ``b``.

    a, b: [n, D] local features; a_all, b_all: [N, D] features of every rank (default: a, b);
    offset: index of this rank's first row in the ``*_all`` tensors; valid_all: [N] bool, rows
    that take part (padding is neither a query nor a candidate). Returns the mean over valid
    local queries of both directions, or 0 (with a graph) when there are none.
    """
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    n, big_n = a.shape[0], a_all.shape[0]
    labels = torch.arange(offset, offset + n, device=a.device)
    if valid_all is None:
        valid_all = torch.ones(big_n, dtype=torch.bool, device=a.device)
    valid = valid_all[offset : offset + n]
    if not valid.any():
        return (a.sum() + b.sum()) * 0.0
    blocked = torch.zeros(big_n, device=a.device).masked_fill(~valid_all, float("-inf"))
    logits_ab = logit_scale * a[valid] @ b_all.T + blocked
    logits_ba = logit_scale * b[valid] @ a_all.T + blocked
    return (F.cross_entropy(logits_ab, labels[valid]) + F.cross_entropy(logits_ba, labels[valid])) / 2
