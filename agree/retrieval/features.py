"""Batched feature extraction on a device."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from agree.progress import progress


@torch.no_grad()
def extract(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    device: torch.device,
    desc: str,
    total: int | None = None,
) -> torch.Tensor:
    """Encode every batch on ``device``; return the features as one float32 CPU tensor.

    On CUDA the encoder runs under bf16 autocast (as open_clip's and CLIP_benchmark's evaluation
    do); features are normalised and returned in float32. They stay on the device until the last
    batch: a copy to the host per batch would wait for that batch, so the host could not prepare
    the next one while the device computes.
    """
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = [
            encode(batch.to(device, non_blocking=True)).float() for batch in progress(batches, desc, total)
        ]
    return torch.cat(out).cpu()
