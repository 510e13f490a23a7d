"""Rows of the paper's results table: model, losses, stage, recalls per direction, RSUM, and the
binding probe's swap accuracy (``None`` where the evaluation had none)."""

from __future__ import annotations

import math

from agree.retrieval import metrics

RECALLS = ("r1", "r5", "r10", "mean_recall")
# Zero-shot evaluations (output name: agree.evaluate overrides): TBR on the raw lists, and on EGR's.
ZERO_SHOT_RUNS = {"tbr": ["rerank=tbr", "rerank.k=20"], "egr_tbr": ["rerank=egr_tbr"]}
# The paper's column order: image-to-text (text retrieval) first, then text-to-image.
DIRECTIONS = metrics.DIRECTIONS[::-1]
SHORT = {d: metrics.SHORT[d].upper() for d in DIRECTIONS}  # "I2T", "T2I"


def zero_shot_stages(results: dict[str, dict]) -> dict[str, dict]:
    """The four zero-shot stages (raw, egr, tbr, egr_tbr) from the results of ``ZERO_SHOT_RUNS``."""
    tbr, egr_tbr = results["tbr"], results["egr_tbr"]
    return {"raw": tbr["raw"], "egr": egr_tbr["egr"], "tbr": tbr["tbr"], "egr_tbr": egr_tbr["tbr"]}


def summary_row(model: str, losses: str, stage: str, block: dict, probe: dict | None = None) -> dict:
    """One row from a ``results.json`` stage block (``{"text_to_image": {...}, ..., "rsum"}``) and
    its ``"probe"`` (the model's, the same for every stage)."""
    return {
        "model": model,
        "losses": losses,
        "stage": stage,
        **{d: {k: float(block[d][k]) for k in RECALLS} for d in DIRECTIONS},
        "rsum": float(block["rsum"]),
        "swap_accuracy": None if probe is None else float(probe["swap_accuracy"]),
    }


def format_summary(rows: list[dict]) -> str:
    """A plain-text table: I→T R@1/5/10, T→I R@1/5/10, RSUM, swap accuracy (%, ``-``: none) per row."""
    head = f"{'model':<11}{'losses':<8}{'stage':<9}" + "".join(
        f"{f'{SHORT[d]} R@{k}':>10}" for d in DIRECTIONS for k in (1, 5, 10)
    )
    lines = [head + f"{'RSUM':>8}{'SWAP':>7}"]
    for row in rows:
        recalls = "".join(f"{row[d][k]:>10.1f}" for d in DIRECTIONS for k in ("r1", "r5", "r10"))
        swap = "-" if row.get("swap_accuracy") is None else f"{100 * row['swap_accuracy']:.1f}"
        lines.append(
            f"{row['model']:<11}{row['losses']:<8}{row['stage']:<9}{recalls}{row['rsum']:>8.1f}{swap:>7}"
        )
    return "\n".join(lines)


def chance_rsum(images: int, captions_per_image: int) -> float:
    """Expected RSUM (%) of a random ranking: one image per caption, ``captions_per_image`` per image."""
    captions = images * captions_per_image
    total = 0.0
    for k in (1, 5, 10):
        total += min(k, images) / images  # text to image: the one image among ``images``
        total += 1 - math.comb(captions - captions_per_image, k) / math.comb(captions, k)  # any positive
    return 100 * total


def demo_problems(rows: list[dict], chance: float, factor: float = 3.0) -> list[str]:
    """What the demo's rows fail to show: zero-shot ``factor`` × chance, fine-tuned above zero-shot."""
    rsum = {(r["model"], r["stage"]): r["rsum"] for r in rows}
    problems = []
    if rsum["zero-shot", "raw"] < factor * chance:
        problems.append(
            f"zero-shot RSUM {rsum['zero-shot', 'raw']:.1f} is under {factor} x chance ({chance:.1f})"
        )
    tuned, zero = rsum["fine-tuned", "raw"], rsum["zero-shot", "raw"]
    if tuned <= zero:
        problems.append(f"fine-tuned RSUM {tuned:.1f} is not above zero-shot {zero:.1f}")
    return problems
