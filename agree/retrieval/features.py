"""Batched feature extraction on a device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from agree.progress import progress

T = TypeVar("T")
_END = object()


def _ahead(batches: Iterable[T]) -> Iterator[T]:
    """``batches``, each one read in a background thread while the previous one is encoded (npz
    reads, tokenisation and torch's kernels release the GIL for parts of their work)."""
    it = iter(batches)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(next, it, _END)
        while (batch := future.result()) is not _END:
            future = pool.submit(next, it, _END)
            yield batch


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
        batches = progress(_ahead(batches), desc, total)
        out = [encode(batch.to(device, non_blocking=True)).float() for batch in batches]
    return torch.cat(out).cpu()
