"""Readable per-query TBR and EGR: the oracle the vectorised re-rankers are checked against.

Plain Python in float64, one query at a time, following the method as the reference release's
loops do: TBR's averaged forward and backward ranks (10000 when absent), EGR's scores and its
three stable sorts (raw score, intermediate score, final score). The vectorised re-rankers of
:mod:`agree.retrieval.rerank` are tested (``tests/test_rerank.py``) and benchmarked
(``scripts/bench_retrieval.py``) against these functions. Slow by design (seconds for a few
hundred queries): never use them for an evaluation.
"""

from __future__ import annotations


def loop_tbr(forward: list[list[int]], backward: list[list[int]], absent: int = 10000) -> list[list[int]]:
    """TBR one query at a time; -1 padding is set aside and appended back."""
    out = []
    for q, preds in enumerate(forward):
        items = [p for p in preds if p >= 0]
        padding = preds[len(items) :]
        if items and backward[items[0]][0] == q:
            out.append(preds)
            continue
        ranked = []
        for forward_rank, p in enumerate(items):
            backward_rank = backward[p].index(q) if q in backward[p] else absent
            ranked.append((p, (forward_rank + backward_rank) / 2))
        ranked = sorted(ranked, key=lambda item: item[1])
        out.append([p for p, _ in ranked] + padding)
    return out


def dot(a: list[float], b: list[float]) -> float:
    """s(a, b) in float64."""
    return sum(x * y for x, y in zip(a, b, strict=True))


def loop_sorts(rows: list[tuple[int, float, float, float]], k: int, depth: int) -> list[int]:
    """Sort by raw, keep depth, then stable sorts by base and by final score, all descending."""
    rows = sorted(rows, key=lambda r: r[1], reverse=True)[:depth]
    rows = sorted(rows, key=lambda r: r[2], reverse=True)
    rows = sorted(rows, key=lambda r: r[3], reverse=True)[:k]
    return [r[0] for r in rows]


def loop_egr_t2i(
    texts,
    images,
    prompts,
    masks,
    valid,
    k,
    depth,
    raw_weight=0.9,
    mask_weight=0.1,
    base_weight=0.99,
    prompt_weight=0.01,
) -> list[list[int]]:
    """Text->image EGR one caption at a time, scoring every image."""
    texts, images = texts.double().tolist(), images.double().tolist()
    prompts, masks, valid = prompts.double().tolist(), masks.double().tolist(), valid.tolist()
    out = []
    for q, t in enumerate(texts):
        slots = [j for j, ok in enumerate(valid[q]) if ok]
        rows = []
        for g, v in enumerate(images):
            s = dot(t, v)
            base = raw_weight * s + mask_weight * sum(s - dot(masks[q][j], v) for j in slots)
            mean = sum(dot(prompts[q][j], v) for j in slots) / len(slots) if slots else 0.0
            rows.append((g, s, base, base_weight * base + prompt_weight * mean))
        out.append(loop_sorts(rows, k, depth))
    return out


def loop_egr_i2t(
    images,
    texts,
    prompts,
    masks,
    valid,
    k,
    depth,
    raw_weight=0.8,
    prompt_weight=0.2,
    base_weight=0.98,
    mask_weight=0.02,
) -> list[list[int]]:
    """Image->text EGR one image at a time, scoring every caption."""
    images, texts = images.double().tolist(), texts.double().tolist()
    prompts, masks, valid = prompts.double().tolist(), masks.double().tolist(), valid.tolist()
    out = []
    for v in images:
        rows = []
        for g, t in enumerate(texts):
            slots = [j for j, ok in enumerate(valid[g]) if ok]
            s = dot(v, t)
            mean = sum(dot(v, prompts[g][j]) for j in slots) / len(slots) if slots else 0.0
            base = raw_weight * s + prompt_weight * mean
            penalty = sum(min(0.0, s - dot(v, masks[g][j])) for j in slots)
            rows.append((g, s, base, base_weight * base + mask_weight * penalty))
        out.append(loop_sorts(rows, k, depth))
    return out
