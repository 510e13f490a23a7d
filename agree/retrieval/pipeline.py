"""Search and re-ranking stages in both directions, from features to ranked index lists."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agree.retrieval.metrics import DIRECTIONS
from agree.retrieval.rerank import egr_image_to_text, egr_text_to_image, tbr
from agree.retrieval.search import topk_both

STAGES = ("egr", "tbr")


def stage_names(stages: Sequence[str]) -> list[str]:
    """The name of each stage's output: the re-rankers applied so far (``["egr", "egr_tbr"]``).

    ``results.json``, the prediction files, the console, the report, the demo and the study all
    name a stage so: TBR on the EGR lists is ``egr_tbr``, on the raw lists ``tbr``.
    """
    return ["_".join(stages[: i + 1]) for i in range(len(stages))]


@dataclass
class EntityFeatures:
    """Per caption: entity-prompt and entity-masked-caption features, and which slots are real."""

    prompts: torch.Tensor  # [T, E, D]
    masks: torch.Tensor  # [T, E, D]
    valid: torch.Tensor  # [T, E] bool

    def to(self, device: torch.device) -> EntityFeatures:
        return EntityFeatures(self.prompts.to(device), self.masks.to(device), self.valid.to(device))


@dataclass
class RankInputs:
    """A test set's features, rows in annotation order, and how the candidates line up."""

    texts: torch.Tensor  # [T, D]
    images: torch.Tensor  # [I, D]
    entities: EntityFeatures | None = None  # each caption's, as a text->image query
    # each caption's as an image->text candidate (None: entities)
    caption_entities: EntityFeatures | None = None
    # the orders the candidates are listed in (permutations of the rows; None: the rows' order)
    text_order: torch.Tensor | None = None
    image_order: torch.Tensor | None = None

    def to(self, device: torch.device) -> RankInputs:
        def move(x):
            return None if x is None else x.to(device)

        return RankInputs(
            self.texts.to(device),
            self.images.to(device),
            move(self.entities),
            move(self.caption_entities),
            move(self.text_order),
            move(self.image_order),
        )


def rank_stages(
    texts: torch.Tensor,
    images: torch.Tensor,
    stages: Sequence[str],
    k: int,
    entities: EntityFeatures | None = None,
    depth: int = 128,
    absent_rank: int = 10000,
    text_to_image: dict | None = None,
    image_to_text: dict | None = None,
    min_raw_k: int = 10,
    caption_entities: EntityFeatures | None = None,
    accumulate: str = "float32",
) -> dict[str, dict[str, torch.Tensor]]:
    """Ranked lists per stage: ``{"raw": {...}, "egr": {...}, "egr_tbr": {...}}`` for the stages asked
    (named by ``stage_names``).

    Each holds ``text_to_image`` [T, k] image indices and ``image_to_text`` [I, k] caption
    indices. Raw lists have at least ``min_raw_k`` entries; each stage works on the previous
    stage's lists (TBR's reverse lists are the other direction's lists of the same stage).
    EGR scores caption queries with ``entities`` and caption candidates with ``caption_entities``
    (default: the same), in ``accumulate``'s arithmetic (``rerank.ACCUMULATE``).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown re-ranking stage {unknown}; stages are {list(STAGES)}")
    if "egr" in stages and entities is None:
        raise ValueError("EGR needs entity features (prompts and masked captions)")
    raw_k = max(k, min_raw_k)
    search_k = max(raw_k, depth) if "egr" in stages else raw_k  # one search also feeds EGR's candidates
    # one pass over the similarities feeds both directions
    searched = dict(zip(DIRECTIONS, topk_both(texts, images, search_k), strict=True))
    lists = {"raw": {d: ranked[:, :raw_k] for d, (_, ranked) in searched.items()}}
    current = {d: ranked[:, :k] for d, ranked in lists["raw"].items()}
    for stage, name in zip(stages, stage_names(stages), strict=True):
        if stage == "egr":
            e, c = entities, caption_entities or entities
            current = {
                "text_to_image": egr_text_to_image(
                    texts,
                    images,
                    e.prompts,
                    e.masks,
                    e.valid,
                    k,
                    depth,
                    search=searched["text_to_image"],
                    accumulate=accumulate,
                    **(text_to_image or {}),
                ),
                "image_to_text": egr_image_to_text(
                    images,
                    texts,
                    c.prompts,
                    c.masks,
                    c.valid,
                    k,
                    depth,
                    search=searched["image_to_text"],
                    accumulate=accumulate,
                    **(image_to_text or {}),
                ),
            }
        else:
            current = {
                "text_to_image": tbr(
                    current["text_to_image"], current["image_to_text"], absent_rank=absent_rank
                ),
                "image_to_text": tbr(
                    current["image_to_text"], current["text_to_image"], absent_rank=absent_rank
                ),
            }
        lists[name] = current
    return lists


def _in_rows(order: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """Indices into rows listed in ``order`` as indices of the rows themselves (-1 padding stays)."""
    return torch.where(lists >= 0, order[lists.clamp(min=0)], -1)


def rank_in_order(inputs: RankInputs, **rank_args) -> dict[str, dict[str, torch.Tensor]]:
    """``rank_stages`` of ``inputs`` (``rank_args``: its other arguments) over the rows listed in
    ``inputs.text_order`` and ``image_order`` (permutations of the rows, None: as they are), so that
    candidates of equal score come in that order (the release ranks its files' rows). The lists are
    returned as those of the rows as given."""
    texts, images = inputs.texts, inputs.images
    entities, caption_entities = inputs.entities, inputs.caption_entities
    if inputs.text_order is None and inputs.image_order is None:
        return rank_stages(texts, images, entities=entities, caption_entities=caption_entities, **rank_args)
    t = torch.arange(len(texts), device=texts.device) if inputs.text_order is None else inputs.text_order
    i = torch.arange(len(images), device=images.device) if inputs.image_order is None else inputs.image_order

    def listed(e: EntityFeatures | None) -> EntityFeatures | None:
        return None if e is None else EntityFeatures(e.prompts[t], e.masks[t], e.valid[t])

    ranked = rank_stages(
        texts[t], images[i], entities=listed(entities), caption_entities=listed(caption_entities), **rank_args
    )
    out = {}
    for stage, lists in ranked.items():
        t2i, i2t = torch.empty_like(lists["text_to_image"]), torch.empty_like(lists["image_to_text"])
        t2i[t], i2t[i] = _in_rows(i, lists["text_to_image"]), _in_rows(t, lists["image_to_text"])
        out[stage] = {"text_to_image": t2i, "image_to_text": i2t}
    return out
