"""Swapped captions: the same words bound differently (NegCLIP's composition-aware negatives,
Yuksekgonul et al., ICLR 2023), made from a caption's entities.

"a red circle left of a blue square" becomes "a blue circle left of a red square" (the attributes
of two entities exchanged: everything before each entity's last word, its head) or, when no two
entities carry distinct attributes, "a blue square left of a red circle" (two entity spans
exchanged). Attribute swaps come first because they always change which attribute goes with
which object, where a span swap can keep the meaning ("a dog and a cat"). The result holds the
caption's words in another order and is never the caption itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

ARTICLES = frozenset({"a", "an", "the"})  # not attributes: "the man" / "a woman" is no binding swap

Span = tuple[int, int]  # [start, end) characters of the caption


def entity_spans(caption: str, entities: Sequence[str]) -> list[Span]:
    """Where the entities occur in ``caption`` (first occurrence, case ignored, whole words only),
    shortest entities first, none overlapping another: the release's segs list noun chunks and the
    longer phrases that contain them, and the chunks are what a swap exchanges. Sorted by start."""
    kept: list[Span] = []
    for entity in sorted(dict.fromkeys(entities), key=lambda e: len(e.split())):
        found = re.search(rf"(?<!\w){re.escape(entity)}(?!\w)", caption, flags=re.IGNORECASE)
        if entity.strip() and found and all(found.end() <= s or found.start() >= e for s, e in kept):
            kept.append(found.span())
    return sorted(kept)


def _attributes(words: list[str]) -> tuple[str, ...]:
    """The attribute words of an entity: those before its head (last word), articles left out."""
    return tuple(w.lower() for w in words[:-1] if w.lower() not in ARTICLES)


def _exchange(caption: str, first: Span, second: Span, new_first: str, new_second: str) -> str:
    """``caption`` with ``first`` (which comes before ``second``) and ``second`` rewritten."""
    (a, b), (c, d) = first, second
    return caption[:a] + new_first + caption[b:c] + new_second + caption[d:]


def swap_candidates(caption: str, entities: Sequence[str]) -> list[str]:
    """Every attribute swap of two entities of ``caption``; without one, every span swap.

    Distinct, never ``caption`` itself (compared ignoring case), in a fixed order; empty for a
    caption with fewer than two entities found in it.
    """
    spans = entity_spans(caption, entities)
    pairs = [(p, q) for i, p in enumerate(spans) for q in spans[i + 1 :]]
    attribute_swaps, span_swaps = [], []
    for p, q in pairs:
        x, y = caption[slice(*p)], caption[slice(*q)]
        span_swaps.append(_exchange(caption, p, q, y, x))
        wx, wy = x.split(), y.split()
        if _attributes(wx) and _attributes(wy) and _attributes(wx) != _attributes(wy):
            new_x = " ".join(wy[:-1] + wx[-1:])  # x's head with y's attributes
            new_y = " ".join(wx[:-1] + wy[-1:])
            attribute_swaps.append(_exchange(caption, p, q, new_x, new_y))
    for found in (attribute_swaps, span_swaps):
        distinct = [s for s in dict.fromkeys(found) if s.lower() != caption.lower()]
        if distinct:
            return distinct
    return []


def swapped_caption(caption: str, entities: Sequence[str], generator: torch.Generator) -> str | None:
    """One of ``swap_candidates`` drawn with ``generator`` (deterministic per seed), or None."""
    candidates = swap_candidates(caption, entities)
    if not candidates:
        return None
    return candidates[int(torch.randint(len(candidates), (), generator=generator))]


def draw_swaps(captions: Sequence[str], entities: Sequence[Sequence[str]], seed: int) -> list[str | None]:
    """A swap (or None) of each caption, drawn in order from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [swapped_caption(c, e, generator) for c, e in zip(captions, entities, strict=True)]
