"""Retrieval benchmarks on 2 CPU cores: re-ranking at Flickr30k test size, JSONL loading, scale.

    python scripts/bench_retrieval.py [--skip-large]

(a) 1,000 images x 5,000 captions x 10 entity slots, 768-d, features in memory: wall time of
    every `rerank` option in both directions, against the readable per-query loops of
    `agree.retrieval.reference_loops` (timed on a subset of queries and extrapolated), loading the
    reference JSONL files, and the start-up of an evaluation from feature files.
(b) 100,000 images x 500,000 captions, 256-d: exact top-10 in both directions, peak memory, one
    pass against two per-direction searches.
(c) how the top-10 time grows with the gallery (3 sizes), one pass against two searches.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agree.data import fast_feature_rows  # noqa: E402
from agree.data.feature_files import (  # noqa: E402
    write_feature_jsonl,
)
from agree.retrieval.pipeline import EntityFeatures, rank_stages  # noqa: E402
from agree.retrieval.reference_loops import loop_egr_i2t, loop_egr_t2i, loop_tbr  # noqa: E402
from agree.retrieval.search import topk_both, topk_similarity  # noqa: E402

OPTIONS = {"none": [], "tbr": ["tbr"], "egr": ["egr"], "egr_tbr": ["egr", "tbr"]}


def unit(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


def flickr_sized(n_images=1000, n_texts=5000, slots=10, dim=768):
    g = torch.Generator().manual_seed(0)
    images, texts = unit(n_images, dim, generator=g), unit(n_texts, dim, generator=g)
    # five captions per image, each near its image
    texts = torch.nn.functional.normalize(texts + images.repeat_interleave(5, 0)[:n_texts], dim=-1)
    valid = torch.arange(slots)[None, :] < torch.randint(0, slots + 1, (n_texts, 1), generator=g)
    prompts = unit(n_texts, slots, dim, generator=g)
    masks = torch.nn.functional.normalize(unit(n_texts, slots, dim, generator=g) + texts[:, None], dim=-1)
    return texts, images, EntityFeatures(prompts, masks, valid)


def best_of(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def loop_seconds(texts, images, entities, k=10, depth=128, sample=4) -> dict[str, float]:
    """The per-query reference loops on ``sample`` queries per direction, scaled to all queries."""
    e = entities
    start = time.perf_counter()
    loop_egr_t2i(texts[:sample], images, e.prompts[:sample], e.masks[:sample], e.valid[:sample], k, depth)
    t2i = (time.perf_counter() - start) / sample * len(texts)
    start = time.perf_counter()
    loop_egr_i2t(images[:sample], texts, e.prompts, e.masks, e.valid, k, depth)
    i2t = (time.perf_counter() - start) / sample * len(images)
    forward = topk_similarity(texts, images, k)[1]
    backward = topk_similarity(images, texts, k)[1]
    start = time.perf_counter()
    loop_tbr(forward.tolist(), backward.tolist())
    loop_tbr(backward.tolist(), forward.tolist())
    tbr = time.perf_counter() - start
    return {"egr": t2i + i2t, "tbr": tbr}


READ = """
import sys, time
from pathlib import Path
from agree.data import fast_feature_rows
from agree.data.feature_files import read_entity_feature_jsonl, read_feature_jsonl
if sys.argv[2] == "validated":
    fast_feature_rows.simdjson = None
folder = Path(sys.argv[1])
start = time.perf_counter()
read_feature_jsonl(folder / "images.jsonl", "image_id")
read_feature_jsonl(folder / "texts.jsonl", "query_id")
for name in ("prompts", "masks"):
    read_entity_feature_jsonl(folder / f"{name}.jsonl", 10)
print(time.perf_counter() - start)
"""


def read_seconds(folder: Path, rows: str) -> float:
    """Seconds to read the 4 feature files of ``folder`` with the readers of ``agree.evaluate``,
    ``rows`` "fast" or "validated", in a fresh process (no cache: ``agree.evaluate`` parses a file once)."""
    command = [sys.executable, "-c", READ, str(folder), rows]
    return float(subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout)


def section_a() -> None:
    texts, images, entities = flickr_sized()
    print("(a) 1,000 images x 5,000 captions x 10 entities, 768-d, features in memory, both directions")
    timings = {}
    for name, stages in OPTIONS.items():
        k = 20 if "egr" in stages else 10
        timings[name] = best_of(lambda: rank_stages(texts, images, stages, k, entities))  # noqa: B023
        print(f"    rerank={name:<8} {timings[name]:.3f} s")
    release = best_of(lambda: rank_stages(texts, images, ["egr"], 20, entities, accumulate="float64"), 2)
    print(f"    rerank=egr with the release's arithmetic (rerank.accumulate=float64): {release:.1f} s")
    loops = loop_seconds(texts, images, entities)
    loop_total = loops["egr"] + loops["tbr"]
    print(
        f"    per-query reference loops (extrapolated): EGR {loops['egr']:.0f} s + TBR {loops['tbr']:.2f} s; "
        f"egr_tbr is {loop_total / timings['egr_tbr']:.0f}x faster"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids_t = [str(i) for i in range(len(texts))]
        ids_i = [str(1000000 + i) for i in range(len(images))]
        write_feature_jsonl(tmp / "images.jsonl", "image_id", ids_i, images.numpy())
        write_feature_jsonl(tmp / "texts.jsonl", "query_id", ids_t, texts.numpy())
        for name in ("prompts", "masks"):
            feats = getattr(entities, name).numpy()
            write_feature_jsonl(tmp / f"{name}.jsonl", "query_id", ids_t, feats, entities.valid.numpy())
        size = sum(p.stat().st_size for p in tmp.iterdir()) / 1e9
        fast = read_seconds(tmp, "fast") if fast_feature_rows.available() else None
        validated = read_seconds(tmp, "validated")
    print(f"    reading the 4 reference JSONL files ({size:.2f} GB):")
    print(f"        every row validated (orjson): {validated:.1f} s ({size * 1e3 / validated:.0f} MB/s)")
    if fast is None:
        print("        fast path: pysimdjson is not installed")
    else:
        print(
            f"        fast path (pysimdjson, the default): {fast:.1f} s ({size * 1e3 / fast:.0f} MB/s, "
            f"{validated / fast:.1f}x)"
        )
    startup()


SEARCHES = ("per-direction", "one-pass")


STARTUP = """
import sys, time
start = time.perf_counter()
import agree.evaluate
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"open_clip", "lightning", "wandb", "torchmetrics"})
print(f"{time.perf_counter() - start:.2f} s, loading {', '.join(heavy) or 'no model, Lightning or W&B code'}")
"""


def startup() -> None:
    """Start-up of an evaluation from feature files: importing ``agree.evaluate`` in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", STARTUP], capture_output=True, text=True, check=True, cwd=REPO
    )
    print(f"    importing agree.evaluate (evaluation from feature files): {done.stdout.strip()}")


def search_both(n_images: int, n_texts: int, dim: int, how: str) -> float:
    """Seconds for exact top-10 in both directions: two searches, or one pass (``topk_both``)."""
    g = torch.Generator().manual_seed(1)
    images, texts = unit(n_images, dim, generator=g), unit(n_texts, dim, generator=g)
    start = time.perf_counter()
    if how == "one-pass":
        topk_both(texts, images, 10)
    else:
        topk_similarity(texts, images, 10)
        topk_similarity(images, texts, 10)
    return time.perf_counter() - start


def section_b_child(n_images: int, n_texts: int, dim: int, how: str) -> None:
    seconds = search_both(n_images, n_texts, dim, how)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"    {n_images:,} images x {n_texts:,} captions, {dim}-d, top-10 both directions, {how:<13}: "
        f"{seconds:.1f} s, peak memory {peak_gib:.2f} GiB"
    )


def section_b() -> None:
    print("(b) large gallery, exact search (fresh processes, so peak memory is each one's own)")
    for how in SEARCHES:
        subprocess.run([sys.executable, __file__, "--child", "100000", "500000", "256", how], check=True)


def section_c() -> None:
    print("(c) growth with gallery size, top-10 both directions, 256-d (images x captions)")
    base = None
    for n_images in (5000, 10000, 20000):
        seconds = {how: search_both(n_images, 5 * n_images, 256, how) for how in SEARCHES}
        base = base or seconds["one-pass"]
        print(
            f"    {n_images:>6,} x {5 * n_images:>7,}: per-direction {seconds['per-direction']:6.2f} s, "
            f"one pass {seconds['one-pass']:6.2f} s ({seconds['per-direction'] / seconds['one-pass']:.2f}x "
            f"faster; {seconds['one-pass'] / base:.1f}x the smallest, the work grows 4x a step)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-large", action="store_true", help="skip (b), the 100k x 500k search")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        section_b_child(*map(int, args.child[:3]), args.child[3])
        return
    torch.set_num_threads(2)
    section_a()
    section_c()
    if not args.skip_large:
        section_b()


if __name__ == "__main__":
    main()
