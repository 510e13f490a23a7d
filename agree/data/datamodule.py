"""AgreeDataModule: training captions and validation images from the reference release layout."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from agree.data.datasets import CollateTrain, CollateVal, EntitySources, Tokenizer, TrainCaptions, ValImages
from agree.data.formats import (
    NpzImages,
    ReleaseLayout,
    read_image_objects,
    read_train_records,
    read_val_records,
    read_vg_vocab,
)
from agree.data.synthetic import SceneConfig, ensure_generated


class AgreeDataModule(L.LightningDataModule):
    """Reads ``flickr30k_train_pred.jsonl`` + train npz and ``flickr30k_val.json`` + val npz.

    ``needs`` (see ``datasets.inputs_for``) selects the entity inputs to load: grounded masks,
    the Visual Genome bank and object lists are read only when an enabled loss uses them.
    With ``synthetic`` set (the ``data=synthetic`` config), a missing dataset is generated first.
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
    ):
        super().__init__()
        self.layout, self.tokenizer, self.synthetic = layout, tokenizer, synthetic
        self.needs, self.max_entities, self.max_entity_words = needs, max_entities, max_entity_words
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers

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
            read_train_records(self.layout.train_records),
            NpzImages(self.layout.images_npz("train"), self.layout.image_size),
            self.needs,
            self.entity_sources(),
            self.max_entities,
            self.max_entity_words,
        )
        self.val_set = ValImages(
            read_val_records(self.layout.val_records),
            NpzImages(self.layout.images_npz("val"), self.layout.image_size),
        )

    def _loader(self, dataset, batch_size: int, collate, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_set,
            self.batch_size,
            CollateTrain(self.tokenizer, self.needs, self.max_entities),
            train=True,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, CollateVal(self.tokenizer), train=False)
