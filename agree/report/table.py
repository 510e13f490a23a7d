"""The plain-text recall table of an evaluation's results (what ``agree.evaluate`` prints)."""

from __future__ import annotations

from agree.data.evaluation_files import PROBE, stage_results
from agree.retrieval.metrics import DIRECTIONS


def format_table(results: dict) -> str:
    """A plain-text recall table: one row per stage and direction; then the binding probe's line."""
    lines = [f"{'stage':<13}{'direction':<15}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mR':>7}{'RSUM':>8}"]
    for stage, block in stage_results(results).items():
        for direction in DIRECTIONS:
            r = block[direction]
            lines.append(
                f"{stage:<13}{direction:<15}{r['r1']:>7.1f}{r['r5']:>7.1f}{r['r10']:>7.1f}"
                f"{r['mean_recall']:>7.1f}{block['rsum']:>8.1f}"
            )
    if results.get(PROBE):
        accuracy, n = results[PROBE]["swap_accuracy"], results[PROBE]["n"]
        lines.append(f"binding probe: swap accuracy {100 * accuracy:.1f} % over {n} captions")
    return "\n".join(lines)
