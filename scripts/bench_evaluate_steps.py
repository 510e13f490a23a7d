"""Where a cache-hit ``agree.evaluate`` run spends its time, step by step.

    python scripts/bench_evaluate_steps.py [--full] [--runs 3]

Writes the release-format feature files of ``bench_release.py`` (200 images x 1,000 captions, or
1,000 x 5,000 with ``--full``: Flickr30k test size), fills a temporary cache of parsed files with
one run, then runs ``python -m agree.evaluate rerank=egr_tbr`` (the default ``method=agree``)
``--runs`` times, each in a fresh process with a timer around the function of each step, and
prints each step's median. Then a process that only imports torch; a bare float32 product of the
shape EGR text->image multiplies, in GFLOP/s, against EGR's own rate; and how many similarities a
product of several rows at once, or a batched product, rounds differently from the one-row products
that ``method=reference`` takes (as the release's loops do).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's agree, as bench_release's
# bench_release (and the project's modules it loads) is imported by main() only: a timed process
# imports nothing but torch before the evaluation's own imports
DEPTH = 128  # EGR's candidates per query (rerank.depth)


def _timed_function(function, label: str, seconds: dict[str, float]):
    @functools.wraps(function)
    def timed_call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

    return timed_call


def run_steps(out: Path, overrides: list[str]) -> None:
    """One ``agree.evaluate`` run in this process (torch already imported), a timer around each
    step's function; the seconds of each step written to ``out`` as JSON."""
    start = time.perf_counter()
    from hydra._internal.hydra import Hydra

    import agree.evaluate as evaluate
    import agree.retrieval.pipeline as pipeline

    seconds = {"importing the rest (Hydra, numpy, the project)": time.perf_counter() - start}
    steps = {
        "Hydra composing the config (twice: once for the run mode)": [(Hydra, "compose_config")],
        "annotations read and checked": [
            (evaluate, name)
            for name in ("read_test_texts", "read_test_images", "read_text_segs", "ground_truth")
        ],
        "the cache: the files hashed, the entries verified and mapped": [(evaluate, "jsonl_features")],
        "exact search, both directions": [(pipeline, "topk_both")],
        "EGR text->image": [(pipeline, "egr_text_to_image")],
        "EGR image->text": [(pipeline, "egr_image_to_text")],
        "TBR": [(pipeline, "tbr")],
        "recalls": [(evaluate, "recall_at_k")],
        "the outputs written (predictions, features, results)": [(evaluate, "write_evaluation")],
    }
    with contextlib.ExitStack() as patches:
        for label, targets in steps.items():
            for owner, name in targets:
                timer = _timed_function(getattr(owner, name), label, seconds)
                patches.enter_context(mock.patch.object(owner, name, timer))
        sys.argv = ["agree.evaluate", *overrides]
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            evaluate.main()
        seconds["the whole run after the imports"] = time.perf_counter() - start
    out.write_text(json.dumps(seconds))


def step_medians(overrides: list[str], folder: Path, runs: int) -> dict[str, float]:
    """The median seconds of each step over ``runs`` fresh processes (:func:`run_steps`) of
    ``agree.evaluate`` with ``overrides``; their output goes to ``folder / "steps.log"``."""
    found = []
    for run in range(runs):
        out = folder / f"steps{run}.json"
        command = [sys.executable, __file__, "--run-steps", str(out), *overrides]
        with open(folder / "steps.log", "ab") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        found.append(json.loads(out.read_text()))
    return {label: statistics.median(run[label] for run in found) for label in found[0]}


def egr_flop(queries: int, gallery: int, dim: int) -> int:
    """EGR text->image's products: two sums of every caption's entity vectors against the gallery."""
    return 2 * 2 * queries * gallery * dim


def product_rate(queries: int, gallery: int, dim: int) -> float:
    """GFLOP/s of a bare float32 product of EGR text->image's shape, [2 * queries, dim] x [dim,
    gallery], median of 5."""
    a, b = torch.randn(2 * queries, dim), torch.randn(gallery, dim)
    a @ b.T
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b.T
        times.append(time.perf_counter() - start)
    return egr_flop(queries, gallery, dim) / statistics.median(times) / 1e9


def rounding(dim: int, slots: int, candidates: int, queries: int = 64) -> tuple[float, float]:
    """Shares of similarities that differ in any bit from the one-row products of ``method=reference``
    (``rerank._row_products``: each entity row of a caption times its candidates): (a product of
    the caption's 2 x ``slots`` rows at once, a batched product over the captions), ``candidates``
    gallery vectors per caption."""
    from agree.retrieval.rerank import _row_products

    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(queries, 2 * slots, dim, generator=g), dim=-1)
    gallery = F.normalize(torch.randn(queries, candidates, dim, generator=g), dim=-1)
    columns = range(rows.shape[1])
    one_row = torch.stack([_row_products(rows[:, j, None], gallery) for j in columns], dim=1)
    several = torch.stack([r @ c.T for r, c in zip(rows, gallery, strict=True)])
    batched = torch.stack([torch.bmm(rows[:, j, None], gallery.mT).squeeze(1) for j in columns], dim=1)
    return (several != one_row).float().mean().item(), (batched != one_row).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="Flickr30k test size (1,000 x 5,000)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes timed (the median is printed)")
    parser.add_argument("--run-steps", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_steps:
        run_steps(Path(args.run_steps[0]), args.run_steps[1:])
        return
    from bench_release import DIM, FEATURES, SLOTS, evaluate_command, median, our_side, timed, write_inputs

    n_images = 1000 if args.full else 200
    size = f"{n_images:,} images x {5 * n_images:,} captions x {SLOTS} entities, {DIM}-d"
    print(f"agree.evaluate's steps: {size}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_inputs(tmp, n_images, 5 * n_images)
        gigabytes = sum(paths[n].stat().st_size for n in FEATURES) / 1e9
        print(f"    {gigabytes:.2f} GB of JSONL features; the cache filled by a first run")
        our_side(paths, tmp / "cache", tmp / "first")
        whole = median(lambda: our_side(paths, tmp / "cache", tmp / "second"), args.runs)
        import_torch = [sys.executable, "-c", "import torch"]
        torch_alone = median(lambda: timed(import_torch, tmp / "torch.log"), args.runs)
        command = evaluate_command(paths, tmp / "cache", f"output_dir={tmp / 'steps'}")
        steps = step_medians(command[command.index("agree.evaluate") + 1 :], tmp, args.runs)
        print(f"    a cache-hit run, the whole process (median of {args.runs}): {whole}")
        print(f"    a process that only imports torch (median of {args.runs}): {torch_alone}")
        print(f"    the steps of a cache-hit run, each in a fresh process (median of {args.runs}):")
        for label, seconds in steps.items():
            print(f"        {label}: {seconds:.3f} s")
    rate = product_rate(5 * n_images, n_images, DIM)
    egr = egr_flop(5 * n_images, n_images, DIM) / steps["EGR text->image"] / 1e9
    print(
        f"    a bare product of EGR text->image's shape: {rate:.0f} GFLOP/s; the EGR step: {egr:.0f} GFLOP/s"
    )
    print("    similarities rounded otherwise than by one-row products (method=reference's):")
    for dim in (DIM, 16):
        for candidates in (DEPTH, 20, 5):
            several, batched = rounding(dim, SLOTS, candidates)
            print(
                f"        {dim}-d, {candidates} candidates: several rows at once {several:.1%},"
                f" a batched product {batched:.1%}"
            )


if __name__ == "__main__":
    main()
