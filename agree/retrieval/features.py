"""Batched feature extraction on a device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from agree.progress import progress

T = TypeVar("T")
_END = object()

# Test-time precision (``features.precision``): fp32, as the release extracts
# (``convert_models_to_fp32``, no autocast); bf16, autocast on the devices below (a speed choice:
# similarities move by about 1e-3). On other devices (a CPU) features are always computed in fp32.
PRECISIONS = ("fp32", "bf16")
AUTOCAST_DEVICES = ("cuda",)


def autocasts(device: torch.device, precision: str) -> bool:
    """Whether encoders run under bf16 autocast on ``device`` at ``precision``."""
    return precision == "bf16" and device.type in AUTOCAST_DEVICES


def lightning_precision(device: torch.device, precision: str) -> str:
    """The ``lightning.Trainer`` precision of a multi-process extraction, as ``extract`` computes."""
    return "bf16-mixed" if autocasts(device, precision) else "32-true"


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
    precision: str = "bf16",
) -> torch.Tensor:
    """Encode every batch on ``device``; return the features as one float32 CPU tensor.

    With ``precision="bf16"`` the encoder runs under bf16 autocast on CUDA (as open_clip's and
    CLIP_benchmark's evaluation do; ``autocasts``); features are returned in float32. They stay on
    the device until the last batch: a copy to the host per batch would wait for that batch, so
    the host could not prepare the next one while the device computes.
    """
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocasts(device, precision)):
        batches = progress(_ahead(batches), desc, total)
        out = [encode(batch.to(device, non_blocking=True)).float() for batch in batches]
    return torch.cat(out).cpu()
