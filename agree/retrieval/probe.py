"""The binding probe: does a model score a caption above its swapped caption (the same words
bound differently, ``agree.data.swaps``) on the caption's own image? ARO's attribute and relation
tests (Yuksekgonul et al., ICLR 2023) in one number; 50 % is a model blind to binding."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SwapFeatures:
    """The features [S, D] of the swapped captions of the test texts ``rows`` [S] (S >= 1)."""

    features: torch.Tensor
    rows: torch.Tensor


def swap_accuracy(
    images: torch.Tensor, texts: torch.Tensor, swaps: SwapFeatures, positives: torch.Tensor
) -> dict:
    """``{"swap_accuracy": share in [0, 1], "n": swapped captions}``.

    images: [I, D], texts: [T, D] features; positives: [T, P] each text's image indices, -1 padded
    (``ground_truth``'s ``text_to_image``). Per swapped caption, the share of its images on which
    ``s(v, t) > s(v, swap)`` (a tie counts half); the accuracy is the mean over swapped captions.
    """
    own = positives[swaps.rows]  # [S, P]
    real = own >= 0
    v = images[own.clamp(min=0)]  # [S, P, D]
    true = (v * texts[swaps.rows][:, None]).sum(-1)
    swapped = (v * swaps.features[:, None]).sum(-1)
    wins = (true > swapped).float() + 0.5 * (true == swapped).float()
    share = (wins * real).sum(1) / real.sum(1).clamp(min=1)
    return {"swap_accuracy": float(share.mean()), "n": len(swaps.rows)}
