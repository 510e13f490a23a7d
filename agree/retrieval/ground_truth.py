"""The test split's ground truth: which items are relevant to each query, per direction."""

from __future__ import annotations

from pathlib import Path

import torch

from agree.data.records import TestImage, TestText
from agree.errors import DataFormatError
from agree.retrieval.metrics import positives_from_pairs


def _relevant_pairs(queries, query_index, item_index, files, noun) -> torch.Tensor:
    """[n, 2] (query, item) index pairs; an item absent from the other file is a data error."""
    pairs = []
    for query_id, item_ids in queries:
        for item_id in item_ids:
            if item_id not in item_index:
                raise DataFormatError(
                    f"{files[0]}: {query_id} names {noun} {item_id}, absent from {files[1]}"
                )
            pairs.append((query_index[query_id], item_index[item_id]))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def ground_truth(
    texts: list[TestText], images: list[TestImage], files: tuple[Path, Path]
) -> dict[str, torch.Tensor]:
    """Padded positives per direction; ``files`` = (texts file, images file) for error messages."""
    image_index = {im.image_id: i for i, im in enumerate(images)}
    text_index = {t.query_id: i for i, t in enumerate(texts)}
    t2i = _relevant_pairs([(t.query_id, t.image_ids) for t in texts], text_index, image_index, files, "image")
    i2t = _relevant_pairs(
        [(i.image_id, i.query_ids) for i in images], image_index, text_index, files[::-1], "query"
    )
    return {
        "text_to_image": positives_from_pairs(*t2i.unbind(1), len(texts)),
        "image_to_text": positives_from_pairs(*i2t.unbind(1), len(images)),
    }
