"""The two kinds of report, an evaluation's and a training run's, written as ``DIR/report.html``."""

from __future__ import annotations

import json
import random
from pathlib import Path

from agree.atomic import atomic_path
from agree.data.evaluation_files import PROBE, EvaluationFiles, stage_results
from agree.report.load import (
    CURVE_K,
    ReportError,
    as_results,
    load_evaluation,
    recall_curves,
    validation_history,
)
from agree.report.page import (
    ARROWS,
    Thumbnails,
    examples,
    page,
    plot_tag,
    probe_section,
    recall_table,
    stage_label,
)
from agree.report.plots import line_plot
from agree.retrieval.metrics import DIRECTIONS, SHORT

VAL_COLUMNS = [*(f"{SHORT[d]}_r{k}" for d in DIRECTIONS for k in (1, 5, 10)), "rsum"]  # as val/<column>


def evaluation_sections(directory: Path, queries: int, seed: int) -> list[str]:
    """Recall table, recall@k curves and sampled examples of an evaluation output."""
    ev = load_evaluation(directory)
    stages = list(ev.lists)
    labels = {stage: stage_label(stages, stage) for stage in stages}
    curves = recall_curves(ev)
    panels = {
        ARROWS[d]: {labels[s]: (list(range(1, len(c[d]) + 1)), c[d]) for s, c in curves.items()}
        for d in DIRECTIONS
    }
    png = line_plot(panels, "k", "recall@k (%)", directory / "recall_curves.png")
    thumbs = Thumbnails(ev.npz, [im.image_id for im in ev.images], normalisation=ev.normalisation)
    rng = random.Random(seed)
    sections = [
        f"<h2>Recall</h2>{recall_table(stage_results(ev.results), labels)}",
        f"<h2>Recall@k, k = 1..{CURVE_K}</h2>{plot_tag(png, 'recall@k curves')}",
    ]
    if ev.results.get(PROBE):
        sections.append(probe_section(ev.results[PROBE]))
    for d, count in (("text_to_image", len(ev.texts)), ("image_to_text", len(ev.images))):
        picks = sorted(rng.sample(range(count), min(queries, count)))
        note = "<p><small>Green: ground truth. ▲/▼: places gained or lost against the raw search.</small></p>"
        sections.append(f"<h2>Examples: {ARROWS[d]}</h2>{note}{examples(ev, d, picks, thumbs, labels)}")
    return sections


def training_sections(directory: Path) -> list[str]:
    """Final validation metrics and their history of a training run."""
    final = json.loads((directory / "metrics.json").read_text())
    sections = [
        f"<h2>Final validation</h2>{recall_table({'final': as_results(final)}, {'final': 'validation'})}"
    ]
    history = validation_history(directory / "csv" / "metrics.csv")
    if not history:
        return [
            *sections,
            "<p>No validation history (<code>csv/metrics.csv</code> comes with <code>logger=csv</code>).</p>",
        ]
    steps = [row["step"] for row in history]
    panels = {
        ARROWS[d]: {f"R@{k}": (steps, [row[f"val/{SHORT[d]}_r{k}"] for row in history]) for k in (1, 5, 10)}
        for d in DIRECTIONS
    }
    png = line_plot(panels, "step", "recall (%)", directory / "val_metrics.png")
    head = "".join(f"<th>{c}</th>" for c in ("epoch", "step", *VAL_COLUMNS))
    rows = "".join(
        f"<tr><td>{row['epoch']:.0f}</td><td>{row['step']:.0f}</td>"
        + "".join(f"<td>{row[f'val/{c}']:.1f}</td>" for c in VAL_COLUMNS)
        + "</tr>"
        for row in history
    )
    return [
        *sections,
        f"<h2>Validation over training</h2>{plot_tag(png, 'validation recall')}<table>{head}{rows}</table>",
    ]


def write_report(directory: str | Path, queries: int = 6, seed: int = 0) -> Path:
    """Write ``DIR/report.html`` for an evaluation output or a training run; return its path."""
    directory = Path(directory).resolve()
    if EvaluationFiles(directory).results.is_file():
        title, sections = "Retrieval evaluation", evaluation_sections(directory, queries, seed)
    elif (directory / "metrics.json").is_file():
        title, sections = "Training run", training_sections(directory)
    else:
        raise ReportError(
            f"{directory}: expected results.json (an agree.evaluate output) "
            "or metrics.json (an agree.train run)"
        )
    path = directory / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page(title, directory, sections), encoding="utf-8")
    return path
