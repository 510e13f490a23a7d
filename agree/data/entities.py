"""Entity rules shared by training, evaluation and data preparation: the prompt, which entities
count, and how a batch's variable number of entity slots is laid out as [N, E] with a mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch

PROMPT_TEMPLATE = "a photo containing {entity}"


def kept_entities(
    entities: Sequence[str], max_words: int | None, max_entities: int | None = None
) -> list[str]:
    """The entities of at most ``max_words`` words (None: any length), the first ``max_entities``
    of them (None: all), in their order."""
    kept = [e for e in entities if max_words is None or len(e.split(" ")) <= max_words]
    return kept if max_entities is None else kept[:max_entities]


def slot_mask(counts: Sequence[int] | torch.Tensor, slots: int) -> torch.Tensor:
    """[N, slots] bool: row i's first ``counts[i]`` slots are real (counts above ``slots`` fill the row)."""
    counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1)
    return torch.arange(slots)[None, :] < counts[:, None]


def scatter_slots(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, E, D] slots from the features [V, D] of the ``valid`` [N, E] slots in row-major order
    (V = ``valid.sum()``); the other slots are zeros. Gradients flow to ``features``.

    A gather by each slot's row number rather than ``masked_scatter``, whose backward (a
    ``masked_select``) makes the host wait for a CUDA device to count the mask.
    """
    flat = valid.reshape(-1)
    rows = flat.cumsum(0) * flat  # each real slot's row in ``features``, 1-based; 0: padding
    padded = torch.cat([features.new_zeros(1, features.shape[-1]), features])
    return padded.index_select(0, rows).view(*valid.shape, -1)
