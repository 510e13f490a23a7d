"""How test rows line up for re-ranking: which entity features go with which caption, and in which
order the candidates are listed.

Entity features come in rows: one per line of ``flickr30k_test_texts_segs.jsonl`` (extracted by a
model) or of the release's entity feature files. A caption as a text→image query takes the row of
its query id. As an image→text candidate it takes the same row (``features.caption_entities=by_id``),
or, as the release's ``make_topk_predictions_mask+prompt.py``, the row at its own position in its
file (``by_position``), which is another caption's when the files list their captions in different
orders. The masked captions of a segs line replace its entities in the test caption of its query id
(``features.masked_text_source=texts``) or in its own ``query_text`` (``text_segs``, the release's
``eval/data.py``). The release also ranks its files' rows: candidates of equal score come in the
order of the test images npz, or of the feature files (``features.gallery_order=files``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from agree.data.records import TestText, TextSegs
from agree.errors import DataFormatError
from agree.retrieval.pipeline import EntityFeatures

MASKED_TEXT_SOURCES = ("texts", "text_segs")
CAPTION_ENTITIES = ("by_id", "by_position")
GALLERY_ORDERS = ("annotations", "files")


def rows_by_id(row_ids: Sequence[str], query_ids: Sequence[str]) -> np.ndarray:
    """[T] the row holding each query id (-1: none)."""
    index = {key: i for i, key in enumerate(row_ids)}
    return np.array([index.get(key, -1) for key in query_ids], dtype=np.int64)


def match_rows(
    row_ids: Sequence[str], query_ids: Sequence[str], positions: np.ndarray | None, path: object
) -> tuple[np.ndarray, np.ndarray]:
    """(text→image rows, image→text rows) [T] of the captions ``query_ids`` among entity rows
    ``row_ids`` (of file ``path``): the row of each caption's id (-1: none), and the row each is
    scored with as a candidate: the same, or the row at ``positions`` (None: by id)."""
    by_id = rows_by_id(row_ids, query_ids)
    if positions is None:
        return by_id, by_id
    beyond = np.flatnonzero(positions >= len(row_ids))
    if len(beyond):
        raise DataFormatError(
            f"{path}: {len(row_ids)} rows, but caption {query_ids[beyond[0]]} is at position "
            f"{positions[beyond[0]] + 1}; features.caption_entities=by_position takes the entities of "
            "a caption's position: give a file with a row per caption, or set it to by_id"
        )
    return by_id, positions.astype(np.int64)


def used_rows(*indices: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the rows any of ``indices`` names, ascending; each index renumbered into them)."""
    used = np.unique(np.concatenate(indices))
    used = used[used >= 0]
    return used, [np.where(ix >= 0, np.searchsorted(used, ix), -1) for ix in indices]


def segs_entity_texts(
    rows: Sequence[TextSegs], texts: Sequence[TestText], source: str
) -> list[tuple[str, list[str]]]:
    """(caption to mask entities in, entities) of each segs line: the test caption of its query id
    (``texts``; a line of no test caption keeps its own) or its own ``query_text`` (``text_segs``)."""
    captions = {t.query_id: t.text for t in texts} if source == "texts" else {}
    return [(captions.get(row.query_id, row.text), list(row.items)) for row in rows]


def select_rows(rows: EntityFeatures, index: np.ndarray) -> EntityFeatures:
    """The entity features of rows ``index`` (-1: a caption without entities); ``rows`` itself
    when ``index`` lists every row in order."""
    if np.array_equal(index, np.arange(len(rows.valid))):
        return rows
    at = torch.from_numpy(index).to(rows.valid.device)
    found = (at >= 0)[:, None]
    picked = at.clamp(min=0)
    return EntityFeatures(
        rows.prompts[picked] * found[..., None],
        rows.masks[picked] * found[..., None],
        rows.valid[picked] & found,
    )


def listing_order(positions: np.ndarray | slice) -> torch.Tensor | None:
    """The rows in the order of their ``positions`` in a file (None: the order they are in)."""
    if isinstance(positions, slice) or bool(np.all(np.diff(positions) > 0)):
        return None
    return torch.from_numpy(np.argsort(positions, kind="stable"))
