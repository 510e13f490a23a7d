"""Batched feature extraction and the binary feature store (``NAME.npy`` + ``NAME.ids.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from agree.io import write_json, write_npy
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
    do); features are normalised and returned in float32.
    """
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = [
            encode(batch.to(device, non_blocking=True)).float().cpu()
            for batch in progress(batches, desc, total)
        ]
    return torch.cat(out)


def save_features(
    directory: str | os.PathLike, name: str, ids: list[str], features: torch.Tensor | np.ndarray
) -> None:
    """Write ``NAME.npy`` (float32 [N, ...]) and ``NAME.ids.json`` (N ids) atomically."""
    features = np.asarray(features, dtype=np.float32)
    if len(ids) != len(features):
        raise ValueError(f"{name}: {len(ids)} ids for {len(features)} feature rows")
    write_npy(Path(directory) / f"{name}.npy", features)
    write_json(Path(directory) / f"{name}.ids.json", list(ids), indent=None)


def load_features(directory: str | os.PathLike, name: str) -> tuple[list[str], np.ndarray]:
    """The ids and the memory-mapped features of a store entry."""
    directory = Path(directory)
    ids = json.loads((directory / f"{name}.ids.json").read_text())
    features = np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    if len(ids) != len(features):
        raise ValueError(f"{directory / name}: {len(ids)} ids for {len(features)} feature rows")
    return ids, features
