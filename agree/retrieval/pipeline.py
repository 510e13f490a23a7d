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
) -> dict[str, dict[str, torch.Tensor]]:
    """Ranked lists per stage: ``{"raw": {...}, "egr": {...}, "egr_tbr": {...}}`` for the stages asked
    (named by ``stage_names``).

    Each holds ``text_to_image`` [T, k] image indices and ``image_to_text`` [I, k] caption
    indices. Raw lists have at least ``min_raw_k`` entries; each stage works on the previous
    stage's lists (TBR's reverse lists are the other direction's lists of the same stage).
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
            e = entities
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
                    **(text_to_image or {}),
                ),
                "image_to_text": egr_image_to_text(
                    images,
                    texts,
                    e.prompts,
                    e.masks,
                    e.valid,
                    k,
                    depth,
                    search=searched["image_to_text"],
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
