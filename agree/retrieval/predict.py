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
    def __init__(self, model: torch.nn.Module, encode: Encode):
        super().__init__()
        self.model, self.encode = model, encode

    def predict_step(self, batch, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, inputs = batch
        return index.cpu(), self.encode(self.model, inputs).float().cpu()


def predict_features(
    model: torch.nn.Module,
    encode: Encode,
    dataset: Dataset,
    batch_size: int,
    trainer: dict,
    num_workers: int = 0,
) -> torch.Tensor:
    """Features [N, D] (float32, CPU) of every item of ``dataset``, encoded by ``trainer``'s processes.

    ``trainer`` holds ``lightning.Trainer`` arguments (``devices``, ``accelerator``, ``strategy``,
    ``precision``...). Items that a sampler repeated to even out processes are written twice with
    the same value.
    """
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    runner = L.Trainer(**trainer, **quiet, enable_checkpointing=False)
    loader = DataLoader(_Numbered(dataset), batch_size=batch_size, num_workers=num_workers)
    parts = runner.predict(_Encoder(model, encode), loader)
    index = torch.cat([i for i, _ in parts])
    features = torch.cat([f for _, f in parts])
    if runner.world_size > 1:
        gathered = [None] * runner.world_size
        dist.all_gather_object(gathered, (index, features))
        index = torch.cat([i for i, _ in gathered])
        features = torch.cat([f for _, f in gathered])
    if len(torch.unique(index)) != len(dataset):
        raise RuntimeError(f"the processes encoded {len(torch.unique(index))} of {len(dataset)} items")
    out = features.new_empty((len(dataset), features.shape[1]))
    out[index] = features
    return out
