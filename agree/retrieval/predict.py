"""Feature extraction over several processes: Lightning's predict loop under DDP.

Each process encodes its share of the items (Lightning gives every process a distributed sampler);
the (index, feature) pairs of all processes are gathered, so every process ends with the features
of all items in dataset order, as a single-process ``features.extract`` would give them.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset


class _Numbered(Dataset):
    """(index, item) pairs of a dataset, so that gathered features can be put back in order."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


Encode = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


class _Encoder(L.LightningModule):
    """The encode function of each predict dataloader (by its index) around one model."""

    def __init__(self, model: torch.nn.Module, encoders: list[Encode]):
        super().__init__()
        self.model, self.encoders = model, encoders

    def predict_step(
        self, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index, inputs = batch
        return index.cpu(), self.encoders[dataloader_idx](self.model, inputs).float().cpu()


def predict_features(
    model: torch.nn.Module,
    passes: list[tuple[Encode, Dataset, int]],
    batch_size: int,
    trainer: dict,
) -> list[torch.Tensor]:
    """Features [N, D] (float32, CPU) of every item of each pass's dataset, encoded by
    ``trainer``'s processes; a pass is (encode, dataset, loader workers).

    One predict run for all passes: Lightning puts the model on each process's own device once
    (and back on the CPU at the end). ``trainer`` holds ``lightning.Trainer`` arguments
    (``devices``, ``accelerator``, ``strategy``, ``precision``...). Items that a sampler repeated
    to even out processes are written twice with the same value.
    """
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    runner = L.Trainer(**trainer, **quiet, enable_checkpointing=False)
    loaders = [
        DataLoader(_Numbered(dataset), batch_size=batch_size, num_workers=workers)
        for _, dataset, workers in passes
    ]
    outputs = runner.predict(_Encoder(model, [encode for encode, _, _ in passes]), loaders)
    if len(passes) == 1:  # Lightning returns one dataloader's outputs unnested
        outputs = [outputs]
    return [
        _in_order(parts, len(dataset), runner.world_size)
        for parts, (_, dataset, _) in zip(outputs, passes, strict=True)
    ]


def _in_order(parts: list, items: int, world_size: int) -> torch.Tensor:
    """One pass's (index, features) batches of every process, as features [items, D] in dataset order."""
    index = torch.cat([i for i, _ in parts])
    features = torch.cat([f for _, f in parts])
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (index, features))
        index = torch.cat([i for i, _ in gathered])
        features = torch.cat([f for _, f in gathered])
    if len(torch.unique(index)) != items:
        raise RuntimeError(f"the processes encoded {len(torch.unique(index))} of {items} items")
    out = features.new_empty((items, features.shape[1]))
    out[index] = features
    return out
