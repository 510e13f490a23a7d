"""The report's HTML: the page with its CSS, the recall table, thumbnails and the per-query examples.

Images are inlined as ``data:`` URIs, so the page needs no other file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from agree.data.npz_images import NpzImages
from agree.data.pixels import thumbnail
from agree.report.load import Evaluation
from agree.retrieval.metrics import DIRECTIONS
from agree.retrieval.search import topk_similarity

ARROWS = {"text_to_image": "text → image", "image_to_text": "image → text"}
TOP = 5  # items shown per query and stage
THUMBNAIL = 96  # px


def data_uri(png: bytes) -> str:
    """A ``data:`` URI of PNG bytes, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_bytes(picture: Image.Image) -> bytes:
    """The picture encoded as PNG."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
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


def stage_label(stages: list[str], stage: str) -> str:
    """``raw search``, or the re-rankers applied up to ``stage`` (``EGR + TBR``)."""
    if stage == "raw":
        return "raw search"
    return " + ".join(s.upper() for s in stages[1 : stages.index(stage) + 1])


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


def probe_section(probe: dict) -> str:
    """The binding probe's accuracy, with what it means."""
    return (
        f"<h2>Binding probe</h2><p>Swap accuracy <b>{100 * probe['swap_accuracy']:.1f} %</b> over "
        f"{probe['n']} test captions: the share of a caption's images that score it above its swap, the "
        "same words with two entities' attributes or spans exchanged. 50 % is a model blind to binding; "
        "100 % always prefers the true caption.</p>"
    )


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
