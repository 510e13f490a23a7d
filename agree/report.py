"""A self-contained HTML report of an evaluation or a training run.

    python -m agree.report DIR [--queries 6] [--seed 0]

For an ``agree.evaluate`` output (DIR holds ``results.json``): the recall table per stage and
direction, recall@k curves for k = 1..20 (also saved as ``recall_curves.png``) and, for sampled
queries of both directions, the top 5 of every stage with thumbnails, the ground truth
highlighted and each item's rank change against the raw search. For an ``agree.train`` run
(``metrics.json``): the final validation metrics and their history from ``csv/metrics.csv``
(plot saved as ``val_metrics.png``). Writes ``DIR/report.html`` (images inlined as data URIs).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from agree.atomic import atomic_path
from agree.data.evaluation_files import read_predictions
from agree.data.feature_files import load_features
from agree.data.json_lines import canonical_id
from agree.data.npz_images import NpzImages
from agree.data.pixels import thumbnail
from agree.data.records import TestImage, TestText, read_test_images, read_test_texts
from agree.retrieval.ground_truth import ground_truth
from agree.retrieval.metrics import DIRECTIONS, SHORT, recall_at_k
from agree.retrieval.search import topk_similarity

ARROWS = {"text_to_image": "text → image", "image_to_text": "image → text"}
CURVE_K = 20  # recall@k curves for k = 1..CURVE_K
TOP = 5  # items shown per query and stage
THUMBNAIL = 96  # px
REPORT_INPUTS = "report_inputs.json"  # written by agree.evaluate
VAL_COLUMNS = [*(f"{SHORT[d]}_r{k}" for d in DIRECTIONS for k in (1, 5, 10)), "rsum"]  # as val/<column>


class ReportError(ValueError):
    """A folder or file the report cannot use; the message names it."""


# ---------------------------------------------------------------------------------------------
# images


def data_uri(png: bytes) -> str:
    """A ``data:`` URI of PNG bytes, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_bytes(picture: Image.Image) -> bytes:
    """The picture encoded as PNG."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def line_plot(panels: dict[str, dict[str, tuple[list, list]]], xlabel: str, ylabel: str, path: Path) -> bytes:
    """Side-by-side panels of labelled lines (``{title: {label: (x, y)}}``); saved as PNG, returned."""
    from matplotlib.figure import Figure  # here, so that importing agree.report stays light
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5 * len(panels), 3.8), dpi=100)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels.items(), strict=True):
        for label, (x, y) in lines.items():
            ax.plot(x, y, marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, 101))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return buffer.getvalue()


class Thumbnails:
    """HTML ``<img>`` tags of test images by index, encoded once each; a labelled box without an npz."""

    def __init__(
        self,
        npz: NpzImages | None,
        image_ids: list[str],
        size: int = THUMBNAIL,
        normalisation: dict | None = None,
    ):
        self.npz, self.image_ids, self.size, self.cache = npz, image_ids, size, {}
        self.normalisation = normalisation or {}  # "mean", "std" of the npz images (default: CLIP's)

    def __call__(self, index: int) -> str:
        image_id = self.image_ids[index]
        label = html.escape(f"image {image_id}")
        if self.npz is None:
            return f'<div class="noimg">{label}</div>'
        if index not in self.cache:
            self.cache[index] = data_uri(
                png_bytes(thumbnail(self.npz[image_id], self.size, **self.normalisation))
            )
        return f'<img src="{self.cache[index]}" alt="{label}" title="{label}">'


# ---------------------------------------------------------------------------------------------
# an evaluation output


@dataclass
class Evaluation:
    """What an ``agree.evaluate`` output holds, in annotation order."""

    results: dict
    texts: list[TestText]
    images: list[TestImage]
    positives: dict[str, torch.Tensor]  # per direction, padded item indices
    features: dict[str, torch.Tensor]  # "texts", "images"
    lists: dict[str, dict[str, torch.Tensor]]  # per stage and direction, ranked item indices (-1: none)
    npz: NpzImages | None
    normalisation: dict  # "mean", "std" of the npz images, as recorded by agree.evaluate


def aligned_features(directory: Path, name: str, ids: list[str]) -> torch.Tensor:
    """The stored features of ``name`` in the order of ``ids``; every id must have a row."""
    stored, rows = load_features(directory, name)
    index = {canonical_id(i): n for n, i in enumerate(stored)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise ReportError(
            f"{directory / name}.ids.json: no feature for {missing[0]} ({len(missing)} missing)"
        )
    return torch.from_numpy(np.asarray(rows)[[index[i] for i in ids]])


def read_ranked(path: Path, id_key: str, queries: list[str], items: list[str]) -> torch.Tensor:
    """A prediction file as item indices [Q, longest list] in query order, -1 padded."""
    query_index = {q: n for n, q in enumerate(queries)}
    item_index = {i: n for n, i in enumerate(items)}
    found_key, predictions = read_predictions(path)
    if found_key != id_key:
        raise ReportError(f"{path}: lines rank by {found_key!r}, expected {id_key!r}")
    ranked = {}
    for line, p in enumerate(predictions, start=1):
        unknown = [p.query_id] * (p.query_id not in query_index) + [
            i for i in p.item_ids if i not in item_index
        ]
        if unknown:
            raise ReportError(f"{path}:{line}: id {unknown[0]} is not in the test annotations")
        ranked[query_index[p.query_id]] = [item_index[i] for i in p.item_ids]
    out = torch.full((len(queries), max(map(len, ranked.values()), default=0)), -1, dtype=torch.long)
    for query, row in ranked.items():
        out[query, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def load_evaluation(directory: Path) -> Evaluation:
    """Results, annotations, features and ranked lists of an evaluation output."""
    inputs_file = directory / REPORT_INPUTS
    if not inputs_file.is_file():
        raise ReportError(f"{inputs_file}: not found (agree.evaluate writes it; evaluate again)")
    inputs = json.loads(inputs_file.read_text())
    files = (Path(inputs["texts"]), Path(inputs["images"]))
    texts, images = read_test_texts(files[0]), read_test_images(files[1])
    query_ids, image_ids = [t.query_id for t in texts], [im.image_id for im in images]
    features = {
        "texts": aligned_features(directory / "features", "texts", query_ids),
        "images": aligned_features(directory / "features", "images", image_ids),
    }
    results = json.loads((directory / "results.json").read_text())
    lists = {
        "raw": {
            "text_to_image": topk_similarity(features["texts"], features["images"], CURVE_K)[1],
            "image_to_text": topk_similarity(features["images"], features["texts"], CURVE_K)[1],
        }
    }
    names = {
        "text_to_image": ("query_id", query_ids, image_ids),
        "image_to_text": ("image_id", image_ids, query_ids),
    }
    for stage in results:
        if stage != "raw":
            lists[stage] = {
                d: read_ranked(directory / "predictions" / f"{stage}_{d}.jsonl", *names[d])
                for d in DIRECTIONS
            }
    npz_path = inputs.get("images_npz")
    npz = NpzImages(npz_path, inputs["image_size"]) if npz_path and Path(npz_path).is_file() else None
    normalisation = {k: inputs[k] for k in ("mean", "std") if inputs.get(k)}  # older outputs: CLIP's
    return Evaluation(
        results, texts, images, ground_truth(texts, images, files), features, lists, npz, normalisation
    )


def stage_label(stages: list[str], stage: str) -> str:
    """``raw search``, or the re-rankers applied up to ``stage`` (``EGR + TBR``)."""
    if stage == "raw":
        return "raw search"
    return " + ".join(s.upper() for s in stages[1 : stages.index(stage) + 1])


def recall_curves(ev: Evaluation) -> dict[str, dict[str, list[float]]]:
    """Recall@k (%) for k = 1..min(CURVE_K, list length), per stage and direction."""
    curves = {}
    for stage, lists in ev.lists.items():
        curves[stage] = {}
        for d, ranked in lists.items():
            ks = tuple(range(1, min(CURVE_K, ranked.shape[1]) + 1))
            recall = recall_at_k(ranked, ev.positives[d], ks)
            curves[stage][d] = [recall[f"r{k}"] for k in ks]
    return curves


# ---------------------------------------------------------------------------------------------
# HTML pieces


def recall_table(results: dict, labels: dict[str, str]) -> str:
    """Recall table, a row per stage and direction; re-ranked rows show their change against the first."""
    head = "".join(f"<th>{h}</th>" for h in ("stage", "direction", "R@1", "R@5", "R@10", "mR", "RSUM"))
    base = next(iter(results.values()))
    rows = []
    for stage, block in results.items():
        for d in DIRECTIONS:
            cells = [
                _number(block[d][key], base[d][key], block is base)
                for key in ("r1", "r5", "r10", "mean_recall")
            ]
            rsum = _number(block["rsum"], base["rsum"], block is base)
            rows.append(
                f"<tr><td>{html.escape(labels[stage])}</td><td>{ARROWS[d]}</td>{''.join(cells)}{rsum}</tr>"
            )
    return f'<table class="recall"><tr>{head}</tr>{"".join(rows)}</table>'


def _number(value: float, base: float, is_base: bool) -> str:
    """A table cell with the value and, off the base row, its signed change."""
    if is_base or abs(value - base) < 0.05:
        return f"<td>{value:.1f}</td>"
    kind = "up" if value > base else "down"
    return f'<td>{value:.1f} <span class="{kind}">{value - base:+.1f}</span></td>'


def _change(raw_rank: int, position: int) -> str:
    """A badge of how far the raw search ranked an item from where this stage puts it."""
    moved = raw_rank - position
    if moved == 0:
        return '<span class="same">=</span>'
    return f'<span class="{"up" if moved > 0 else "down"}">{"▲" if moved > 0 else "▼"}{abs(moved)}</span>'


def _stage_row(
    label: str, ranked: list[int], truth: set[int], raw_rank: torch.Tensor | None, view: Callable[[int], str]
) -> str:
    """One stage's top 5 for one query; ``raw_rank`` (each item's 1-based raw rank) adds change badges."""
    positions = [p for p, item in enumerate(ranked, start=1) if item in truth]
    found = f"ground truth at #{positions[0]}" if positions else f"ground truth not in top {len(ranked)}"
    cards = []
    for position, item in enumerate(ranked[:TOP], start=1):
        change = "" if raw_rank is None else _change(int(raw_rank[item]), position)
        kind = "card gt" if item in truth else "card"
        cards.append(
            f'<figure class="{kind}">{view(item)}<figcaption>#{position} {change}</figcaption></figure>'
        )
    head = f'<div class="label">{html.escape(label)}<small>{found}</small></div>'
    return f'<div class="stage">{head}{"".join(cards)}</div>'


def examples(ev: Evaluation, direction: str, picks: list[int], thumbs: Thumbnails, labels: dict) -> str:
    """Per sampled query: a row per stage with its top 5, ground truth marked, rank changes shown."""
    if direction == "text_to_image":
        queries, gallery, view = "texts", "images", thumbs
    else:
        queries, gallery = "images", "texts"
        view = lambda i: f"<p>{html.escape(ev.texts[i].text)}</p>"  # noqa: E731
    order = topk_similarity(ev.features[queries][picks], ev.features[gallery], len(ev.features[gallery]))[1]
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(1, order.shape[1] + 1).expand_as(order))
    blocks = []
    for row, query in enumerate(picks):
        truth = {i for i in ev.positives[direction][query].tolist() if i >= 0}
        if direction == "text_to_image":
            head = f'<p class="query">“{html.escape(ev.texts[query].text)}”</p>'
        else:
            image_id = html.escape(ev.images[query].image_id)
            head = f'<div class="query">{thumbs(query)}<span>image {image_id}</span></div>'
        lines = [_stage_row(labels["raw"], order[row].tolist(), truth, None, view)]
        for stage in list(ev.lists)[1:]:
            ranked = [i for i in ev.lists[stage][direction][query].tolist() if i >= 0]
            lines.append(_stage_row(labels[stage], ranked, truth, ranks[row], view))
        blocks.append(f'<div class="example">{head}{"".join(lines)}</div>')
    return "".join(blocks)


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1200px;color:#222;
 background:#fff;padding:0 16px}
h1{font-size:1.5em} h2{margin-top:1.6em;border-bottom:1px solid #ddd} small{color:#666}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,td:nth-child(2),th{text-align:left} th{background:#f2f2f2}
.up{color:#1a7f37;font-weight:600} .down{color:#c62828;font-weight:600} .same{color:#888}
img.plot{max-width:100%;border:1px solid #eee}
.example{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:12px 0}
.query{font-size:1.05em;font-weight:600;display:flex;align-items:center;gap:12px;margin:4px 0 8px}
.stage{display:flex;align-items:flex-start;gap:8px;margin:6px 0}
.label{width:130px;flex:none;font-weight:600} .label small{display:block;font-weight:400}
.card{margin:0;width:124px;border:4px solid transparent;border-radius:4px;padding:2px;text-align:center;
 background:#fafafa} .card img,.noimg{width:96px;height:96px;display:block;margin:0 auto}
.card p{font-size:.8em;margin:2px;text-align:left;min-height:4.5em}
.card.gt{border-color:#1a9850;background:#e9f7ef}
.card.gt figcaption::after{content:"✓ ground truth";display:block;color:#1a7f37}
.noimg{background:#ddd;font-size:.75em;display:flex;align-items:center;justify-content:center}
figcaption{font-size:.8em}
"""

# Marks on <body> how many images decoded: a check for people and for the browser test.
SCRIPT = """window.addEventListener('load',()=>{const all=[...document.images];
document.body.dataset.imagesLoaded=all.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+all.length;});"""


def page(title: str, directory: Path, sections: list[str]) -> str:
    """The whole self-contained HTML document."""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><h1>{html.escape(title)}</h1>"
        f"<p><small>{html.escape(str(directory))}</small></p>{''.join(sections)}</body></html>\n"
    )


def plot_tag(png: bytes, alt: str) -> str:
    """An inlined ``<img>`` of a plot."""
    return f'<img class="plot" src="{data_uri(png)}" alt="{html.escape(alt)}">'


# ---------------------------------------------------------------------------------------------
# the two kinds of report


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
        f"<h2>Recall</h2>{recall_table(ev.results, labels)}",
        f"<h2>Recall@k, k = 1..{CURVE_K}</h2>{plot_tag(png, 'recall@k curves')}",
    ]
    for d, count in (("text_to_image", len(ev.texts)), ("image_to_text", len(ev.images))):
        picks = sorted(rng.sample(range(count), min(queries, count)))
        note = "<p><small>Green: ground truth. ▲/▼: places gained or lost against the raw search.</small></p>"
        sections.append(f"<h2>Examples: {ARROWS[d]}</h2>{note}{examples(ev, d, picks, thumbs, labels)}")
    return sections


def validation_history(path: Path) -> list[dict[str, float]]:
    """The rows of a CSVLogger ``metrics.csv`` that hold validation metrics, as numbers."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/rsum")]
    return [
        {k: float(v) for k, v in r.items() if v and (k.startswith("val/") or k in ("step", "epoch"))}
        for r in rows
    ]


def as_results(metrics: dict[str, float]) -> dict:
    """``val/t2i_r1``-style metrics as a results block of ``agree.evaluate``."""
    block = {}
    for d in DIRECTIONS:
        recall = {f"r{k}": metrics[f"val/{SHORT[d]}_r{k}"] for k in (1, 5, 10)}
        block[d] = {**recall, "mean_recall": sum(recall.values()) / 3}
    return {**block, "rsum": metrics["val/rsum"]}


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
    if (directory / "results.json").is_file():
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="an agree.evaluate output or an agree.train run")
    parser.add_argument("--queries", type=int, default=6, help="sampled queries per direction")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query sample")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.directory, args.queries, args.seed)
    except (ValueError, OSError) as e:
        raise SystemExit(f"agree.report: {e}") from None
    print(path)


if __name__ == "__main__":
    main()
