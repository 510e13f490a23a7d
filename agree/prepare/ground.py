"""``ground``: grounded entities (``preds``) and the grounded-entity masked images.

    python -m agree.prepare ground root=out images=flickr30k-images \
        detector=google/owlv2-base-patch16-ensemble model=ViT-L-14-quickgelu

Every entity of a training caption (up to ``max_words`` words) is a text query to an
open-vocabulary detector from ``transformers`` (OWL-ViT, OWLv2 or Grounding DINO; the reference
used GLIP), once per image. Each entity gets its best box and score: ``preds`` lists
``{entity: score}`` per entity in caption order, ``{"object": score}`` when the score is below
``threshold`` (or the box falls outside the preprocessed image). For every grounded entity the
image with that box blanked (black, then normalised) is stored in
``<prefix>_visual_grounding.<size>.npz`` under ``"{flickr_id}_{entity}"``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING

from agree.atomic import write_jsonl
from agree.config import resolve_device
from agree.data.entities import kept_entities
from agree.data.json_lines import read_jsonl
from agree.data.layout import ReleaseLayout
from agree.data.records import NO_GROUNDING_LABEL, flickr_id
from agree.errors import ConfigError, DataFormatError, one_line
from agree.prepare.images import ImageOptions, Preprocess, image_file, load_image
from agree.prepare.shards import ShardResult, Shards


@dataclass
class Config(ImageOptions):
    root: str = MISSING  # the release folder (its train jsonl gets ``preds``)
    images: str = MISSING  # the image folder named by the ``image`` fields (as given to ``karpathy``)
    prefix: str = "flickr30k"
    input: str | None = None  # the train jsonl with ``segs``; null: the one under ``root``
    detector: str = "google/owlv2-base-patch16-ensemble"  # a transformers hub id or local folder
    threshold: float = 0.1  # best-box score below which an entity is "object"
    max_words: int = 7  # longer entities are not queried (training drops them too)
    device: str = "auto"
    shard_size: int = 32
    overwrite: bool = False  # replace existing preds and grounding npz


def locate_detector(name: str) -> str:
    """``name`` (a local folder or a hub id) as ``from_pretrained`` should load it: a hub id found in
    the local cache as its snapshot folder. An id not cached costs one request to the hub, without
    the retries of ``transformers``' downloads (minutes offline): unreachable, it is one line."""
    if Path(name).expanduser().is_dir():
        return name
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    hint = f"set detector=<a local folder holding the model>, or download {name} where there is network"
    try:
        return huggingface_hub.snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except HFValidationError:  # a path that is no folder, and not of a hub id's form either
        raise ConfigError(
            f"detector={name!r}: cannot load it (no such folder, nor a hub id); {hint}"
        ) from None
    try:
        huggingface_hub.model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ConfigError(
            f"detector={name}: no such folder, nor a model of the Hugging Face hub; {hint}"
        ) from None
    except Exception as e:  # the transport's errors differ between hub client versions
        raise ConfigError(
            f"detector={name}: not in the local Hugging Face cache, and the hub cannot be reached "
            f"({type(e).__name__}: {one_line(e)}); {hint} (`hf download {name}`)"
        ) from None
    return name  # reachable: transformers downloads it


class Detector:
    """The best box (x0, y0, x1, y1 in pixels) and score of each text query on an image."""

    def __init__(self, name: str, device: str):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        source = locate_detector(name)
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(source).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"detector={name!r}: cannot load it ({str(e).splitlines()[0]})") from None
        self.kind = self.model.config.model_type
        if self.kind not in ("owlvit", "owlv2", "grounding-dino"):
            raise ConfigError(
                f"detector={name!r} is a {self.kind} model; use OWL-ViT, OWLv2 or Grounding DINO"
            )
        self.device = resolve_device(device)
        self.model.to(self.device)

    @torch.no_grad()
    def __call__(self, image, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """([Q, 4] boxes, [Q] scores) for ``queries`` on a PIL image."""
        probs, boxes = (
            self._grounding_dino(image, queries)
            if self.kind == "grounding-dino"
            else self._owl(image, queries)
        )
        best = probs.argmax(0)
        width, height = image.size
        if self.kind == "owlv2":  # OWLv2 pads the image to a square: boxes are relative to it
            width = height = max(width, height)
        cx, cy, w, h = boxes[best].unbind(-1)
        corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        scale = torch.tensor([width, height, width, height], dtype=corners.dtype, device=corners.device)
        scores = probs[best, torch.arange(len(queries), device=probs.device)]
        return (corners * scale).float().cpu().numpy(), scores.float().cpu().numpy()

    def _owl(self, image, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([boxes, Q] probabilities, [boxes, 4] cxcywh boxes): one text query per entity."""
        inputs = self.processor(text=[queries], images=image, return_tensors="pt", truncation=True)
        out = self.model(**inputs.to(self.device))
        return out.logits[0].sigmoid(), out.pred_boxes[0]

    def _grounding_dino(self, image, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt "e1. e2. ..."; an entity's probability is the best of its tokens' (as GLIP)."""
        prompt = "".join(f"{q}. " for q in queries).strip()
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        out = self.model(**inputs.to(self.device))
        offsets = self.processor.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        tokens = out.logits[0].sigmoid()[:, : len(offsets)]  # [boxes, tokens]
        probs = torch.zeros(len(tokens), len(queries), device=tokens.device)
        start = 0
        for j, query in enumerate(queries):
            end = start + len(query)
            mine = [
                t for t, (a, b) in enumerate(offsets[: tokens.shape[1]]) if b > a and a >= start and b <= end
            ]
            if mine:
                probs[:, j] = tokens[:, mine].max(-1).values
            start = end + 2
        return probs, out.pred_boxes[0]


@functools.cache
def load_detector(name: str, device: str) -> Detector:
    return Detector(name, device)


@dataclass(frozen=True)
class GroundImages:
    """Shard work: ``{"image", "file", "queries"}`` items -> scores per query, masked images."""

    detector: str
    device: str
    preprocess: Preprocess
    threshold: float

    def __call__(self, items: Sequence[dict]) -> ShardResult:
        detector, pre = load_detector(self.detector, self.device), self.preprocess
        rows, masks = [], {}
        for item in items:
            scores = {}
            if item["queries"]:
                image = load_image(item["file"])
                pixels = pre.pixels(image)
                boxes, probs = detector(image, item["queries"])
                for query, box, score in zip(item["queries"], boxes, probs, strict=True):
                    blank = pre.map_box(image.size, tuple(box)) if score >= self.threshold else None
                    if blank is not None:
                        masks[f"{flickr_id(item['image'])}_{query}"] = pre.array(pixels, blank)
                    scores[query] = [round(float(score), 3), blank is not None]
            rows.append({"scores": scores})
        return ShardResult(rows=rows, arrays={"masks": masks})


def read_segmented(path: Path) -> list[dict]:
    """Train jsonl rows that all have ``segs`` (else: run ``entities`` first)."""
    rows = read_jsonl(path, {"image": str, "caption": str})
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("segs"), list):
            raise DataFormatError(
                f"{path}:{number}: no 'segs' list; run `python -m agree.prepare entities input={path}` first"
            )
    return rows


def queries_per_image(rows: list[dict], max_words: int) -> dict[str, list[str]]:
    """{image field: its captions' distinct entities of at most ``max_words`` words}, in file order."""
    out: dict[str, dict[str, None]] = {}
    for row in rows:
        kept = out.setdefault(row["image"], {})
        for seg in kept_entities(row["segs"], max_words):
            kept.setdefault(seg, None)
    return {image: list(queries) for image, queries in out.items()}


def run(cfg: Config) -> ReleaseLayout:
    preprocess = cfg.preprocess()
    root = Path(cfg.root)
    layout = ReleaseLayout(root, root.parent / "VG", preprocess.size, cfg.prefix)
    path = Path(cfg.input) if cfg.input else layout.train_records
    rows = read_segmented(path)
    if not cfg.overwrite and (any("preds" in row for row in rows) or layout.grounding_npz.exists()):
        done = path if any("preds" in row for row in rows) else layout.grounding_npz
        raise ConfigError(f"{done} holds grounded entities already; set overwrite=true to ground again")
    folder = Path(cfg.images)
    items = [
        {"image": image, "file": str(image_file(folder, image)), "queries": queries}
        for image, queries in queries_per_image(rows, cfg.max_words).items()
    ]
    missing = [item["file"] for item in items if not Path(item["file"]).is_file()]
    if missing:
        raise DataFormatError(
            f"{missing[0]}: image not found ({len(missing)} of {len(items)} images of {path})"
        )
    load_detector(cfg.detector, cfg.device)  # fail early when it cannot be loaded
    params = {"step": "ground", "detector": cfg.detector, "threshold": cfg.threshold, **preprocess.params()}
    shards = Shards(layout.grounding_npz, items, cfg.shard_size, params)
    shards.run(GroundImages(cfg.detector, cfg.device, preprocess, cfg.threshold), "ground", "img")
    scores = {item["image"]: row["scores"] for item, row in zip(items, shards.rows(), strict=True)}
    masks = shards.merge_npz("masks", layout.grounding_npz)
    for row in rows:
        found = scores[row["image"]]
        row["preds"] = [
            {seg if found[seg][1] else NO_GROUNDING_LABEL: found[seg][0]}
            for seg in row["segs"]
            if seg in found
        ]
    write_jsonl(path, rows)
    shards.remove()
    print(
        f"ground: {masks} grounded entities of {len(items)} images -> {layout.grounding_npz}", file=sys.stderr
    )
    return layout
