"""AgreeDataModule: training captions and validation images from the reference release layout."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from agree.data.datasets import CollateTrain, CollateVal, EntitySources, Tokenizer, TrainCaptions, ValImages
from agree.data.layout import ReleaseLayout
from agree.data.npz_images import NpzImages
from agree.data.pixels import black
from agree.data.records import (
    prepared_fields,
    read_image_objects,
    read_train_records,
    read_val_records,
    read_vg_vocab,
)
from agree.data.synthetic import SceneConfig, ensure_generated


class EpochSampler(DistributedSampler):
    """This process's share of a permutation seeded from ``seed + epoch``, as ``(index, epoch)`` keys.

    Lightning calls ``set_epoch`` at each epoch start. ``start`` skips that many keys of the next
    iteration only (a resumed epoch), without loading them. A ``DistributedSampler``, so that
    Lightning does not wrap it under DDP.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start, epoch = self.start, 0, self.epoch
        return ((index, epoch) for index in itertools.islice(super().__iter__(), start, None))


class ResumableLoader(DataLoader):
    """A training DataLoader that resumes mid-epoch.

    Its state is the epoch and the number of batches it has handed out; after
    ``load_state_dict``, iterating that epoch again skips those batches (by index, so they are
    not loaded), and the run goes on with exactly the batches an uninterrupted run would see.
    Needs an ``EpochSampler`` and ``drop_last=True`` (all batches full).
    """

    sampler: EpochSampler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch, self._batches = 0, 0
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator:
        # a generator: runs at the first batch, after Lightning's set_epoch
        if not isinstance(self.sampler, EpochSampler):  # trainer.overfit_batches: Lightning's own sampler
            yield from super().__iter__()
            return
        epoch, resume = self.sampler.epoch, self._resume
        self._resume = None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        self.sampler.start = skip * self.batch_size
        self._epoch, self._batches = epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch


class AgreeDataModule(L.LightningDataModule):
    """Reads ``flickr30k_train_pred.jsonl`` + train npz and ``flickr30k_val.json`` + val npz.

    ``needs`` (see ``datasets.inputs_for``) selects the entity inputs to load: grounded masks,
    the Visual Genome bank and object lists are read only when an enabled loss uses them.
    With ``synthetic`` set (the ``data=synthetic`` config), a missing dataset is generated first.
    Training batches are shuffled per epoch from ``seed`` and resume mid-epoch (``ResumableLoader``).
    """

    def __init__(
        self,
        layout: ReleaseLayout,
        tokenizer: Tokenizer,
        batch_size: int = 32,
        val_batch_size: int = 64,
        num_workers: int = 0,
        needs: frozenset[str] = frozenset(),
        max_entities: int = 5,
        max_entity_words: int = 7,
        synthetic: SceneConfig | None = None,
        seed: int = 0,
        fallback_mask: str = "black",
        mask_ignore_case: bool = True,
        encode_empty_slots: bool = False,
    ):
        super().__init__()
        self.seed, self.fallback_mask = seed, fallback_mask
        self.mask_ignore_case, self.encode_empty_slots = mask_ignore_case, encode_empty_slots
        self.layout, self.tokenizer, self.synthetic = layout, tokenizer, synthetic
        self.needs, self.max_entities, self.max_entity_words = needs, max_entities, max_entity_words
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self._train_loader: ResumableLoader | None = None
        self._loader_state: dict | None = None

    # Lightning 2.6 restores a stateful train loader only if it is created after the checkpoint is
    # read, but ``estimated_stepping_batches`` (our LR schedule) creates it before; a datamodule's
    # state is read before either, so the loader's position travels in the datamodule's state.
    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._loader_state = state.get("train_loader")

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_generated(self.layout.root, self.synthetic)

    def entity_sources(self) -> EntitySources:
        """Open only the entity files that ``needs`` asks for."""
        layout, size, sources = self.layout, self.layout.image_size, EntitySources()
        if "ground_masked" in self.needs:
            sources.grounding = NpzImages(layout.grounding_npz, size)
        if "vg" in self.needs:
            sources.image_objects = {}
            for split in ("train", "val", "test"):  # the reference joins all three lists
                if layout.image_objects(split).is_file() or split == "train":
                    sources.image_objects.update(read_image_objects(layout.image_objects(split)))
            sources.vg_ids = read_vg_vocab(layout.vg_vocab)
            sources.vg_images = NpzImages(layout.vg_images_npz, size)
        if "vg_masked" in self.needs:
            sources.vg_masked = NpzImages(layout.vg_mask_images_npz, size)
        return sources

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TrainCaptions(
            read_train_records(self.layout.train_records, prepared_fields(self.needs)),
            NpzImages(self.layout.images_npz("train"), self.layout.image_size),
            self.needs,
            self.entity_sources(),
            self.max_entities,
            self.max_entity_words,
            self.seed,
            self.fallback_mask,
            tuple(map(float, black(self.layout.mean, self.layout.std))),
        )
        self.val_set = ValImages(
            read_val_records(self.layout.val_records),
            NpzImages(self.layout.images_npz("val"), self.layout.image_size),
        )

    def _workers(self) -> dict:
        # pinned host memory makes the copy to a GPU asynchronous (the step's .to(non_blocking=True))
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def train_dataloader(self) -> ResumableLoader:
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_loader = ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochSampler(self.train_set, self.seed, replicas, rank),
            drop_last=True,
            collate_fn=CollateTrain(
                self.tokenizer, self.needs, self.max_entities, self.mask_ignore_case, self.encode_empty_slots
            ),
            **self._workers(),
        )
        if self._loader_state is not None:
            self._train_loader.load_state_dict(self._loader_state)
            self._loader_state = None
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.val_batch_size,
            collate_fn=CollateVal(self.tokenizer),
            **self._workers(),
        )
