"""Side by side with the release's own evaluation scripts, from the same JSONL feature files.

    python scripts/bench_release.py [--release-dir PATH/EasyNLP/examples/agree] [--full]
    python scripts/bench_release.py --transcription [--full]

The release's zero-shot re-ranking (``run_flickr30k_zs_rerank.sh`` after feature extraction:
``eval/make_topk_predictions_mask+prompt.py`` with top-20 and batch 32, ``eval/eval_back_retrieval.py``,
``eval/evaluation.py`` for each direction) against ``python -m agree.evaluate rerank=egr_tbr`` on
the same files: parse, exact search, EGR, TBR, predictions and recalls written. Ours runs as a
user would: the first run parses the files and fills the cache of parsed files
(``agree.data.feature_cache``, in a temporary ``cache_dir``); the second reads them from it (run
3 times, the median printed: a 2-second process varies by tenths of a second from run to run);
both under the default ``method=agree`` (EGR in float32: near-tied candidates may swap). Then one
run with the cache filled under ``method=reference`` (the release's arithmetic: per-query float32
products, float64 sums, so the same lists bit for bit). Each side runs as its own processes; the
wall time of each and the ratios are printed, then the outputs are compared (the same EGR and TBR
top-20 lists and the same recalls, but for swaps of near-tied candidates under ``method=agree``,
and the second run's files equal to the first's), so the sides did equal work. Then hashing the
four files (the cache's key) against the parse it saves, and 20 EGR settings as one sweep (``-m``,
one process) against 20 single runs, with the cache filled. With ``--full`` and the release, the
aim (the second run's whole process 60x faster than the release's) is checked, and a process that
only imports torch is timed: the release's time over it bounds any such process's ratio.

The release's scripts are not shipped here: point ``--release-dir`` (or ``AGREE_RELEASE_DIR``) at
``examples/agree`` of an EasyNLP checkout; without it, only our side runs. They run unmodified; the
one change needed on a machine without a GPU is made from outside: ``Tensor.cuda`` returns the
tensor itself (``--run-release``).

``--transcription`` needs no checkout: it compares the EGR lists and recalls of ``agree.evaluate
rerank=egr`` under ``method=reference`` and ``method=agree`` with those of the transcription of
``make_topk_predictions_mask+prompt.py`` in ``tests/test_reference_method.py`` (``release_egr``:
the script's per-query products and Python-float sums), on the same files.

Default size: 200 images x 1,000 captions (the release's per-pair Python loops take minutes at full
size); ``--full``: Flickr30k test size, 1,000 x 5,000. Both: 10 entity vectors per caption (the
release's files always hold 10), 768-d.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agree.data.evaluation_files import read_predictions  # noqa: E402
from agree.data.feature_cache import file_digest  # noqa: E402
from agree.data.feature_files import read_entity_feature_jsonl, read_feature_jsonl, write_feature_jsonl  # noqa: E402

SLOTS, DIM = 10, 768
FEATURES = ("images", "texts", "prompts", "masks")
SWEEP = ",".join(f"{0.80 + 0.01 * i:.2f}" for i in range(20))  # rerank.text_to_image.raw_weight
STAGES = {"egr": "", "egr_tbr": "_rerank"}  # our stage -> suffix of the release's prediction files


def run_release(script: str, args: list[str]) -> None:
    """Run one of the release's scripts in this process as ``__main__``, on the CPU when no GPU."""
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # the scripts move every tensor with .cuda()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def write_inputs(folder: Path, n_images: int, n_texts: int) -> dict[str, Path]:
    """Release-format features and annotations: 5 captions per image, 10 entity vectors each."""
    g = torch.Generator().manual_seed(0)

    def unit(*shape: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    images = unit(n_images, DIM)
    # captions near their image, but not so near that every recall is 100
    texts = torch.nn.functional.normalize(unit(n_texts, DIM) + 0.08 * images.repeat_interleave(5, 0), dim=-1)
    prompts = unit(n_texts, SLOTS, DIM)
    masks = torch.nn.functional.normalize(unit(n_texts, SLOTS, DIM) + texts[:, None], dim=-1)
    image_ids = [str(1000000 + i) for i in range(n_images)]
    text_ids = [str(i) for i in range(n_texts)]
    paths = {name: folder / f"{name}.jsonl" for name in ("images", "texts", "prompts", "masks")}
    write_feature_jsonl(paths["images"], "image_id", image_ids, images.numpy())
    write_feature_jsonl(paths["texts"], "query_id", text_ids, texts.numpy())
    valid = torch.ones(n_texts, SLOTS, dtype=torch.bool).numpy()
    write_feature_jsonl(paths["prompts"], "query_id", text_ids, prompts.numpy(), valid)
    write_feature_jsonl(paths["masks"], "query_id", text_ids, masks.numpy(), valid)
    annotations = {
        "test_images": [
            {"image_id": int(i), "item_ids": list(range(n * 5, n * 5 + 5))} for n, i in enumerate(image_ids)
        ],
        "test_texts": [
            {"query_id": q, "query_text": f"caption {q}", "item_ids": [int(image_ids[q // 5])]}
            for q in range(n_texts)
        ],
        "text_segs": [
            {"query_id": q, "query_text": f"caption {q}", "items": [f"entity {j}" for j in range(SLOTS)]}
            for q in range(n_texts)
        ],
    }
    for name, rows in annotations.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@dataclass(frozen=True)
class Seconds:
    """Wall time, and CPU time (user + system) of the processes: on a shared machine the wall time
    of a process also counts the others' turns on the cores."""

    wall: float
    cpu: float

    def __add__(self, other: Seconds) -> Seconds:
        return Seconds(self.wall + other.wall, self.cpu + other.cpu)

    def __str__(self) -> str:
        return f"{self.wall:.1f} s ({self.cpu:.1f} s CPU)"


def ratio(slow: Seconds, fast: Seconds) -> str:
    return f"{slow.wall / fast.wall:.1f}x ({slow.cpu / fast.cpu:.1f}x in CPU time)"


def timed(command: list[str], log: Path) -> Seconds:
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "ab") as out:
        subprocess.run(command, check=True, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Seconds(time.perf_counter() - start, cpu)


def release_side(release: Path, p: dict[str, Path], out: Path) -> Seconds:
    """The release's scripts as run_flickr30k_zs_rerank.sh runs them; their total time."""
    eval_dir, log = release / "eval", out / "release.log"
    shim = [sys.executable, __file__, "--run-release"]
    t2i, i2t = (out / f"test_{name}_predictions_mask+prompt.jsonl" for name in ("texts", "images"))
    t2i_tbr, i2t_tbr = (path.with_name(path.stem + "_rerank.jsonl") for path in (t2i, i2t))
    steps = [
        [str(eval_dir / "make_topk_predictions_mask+prompt.py"), f"--image-feats={p['images']}",
         f"--text-feats={p['texts']}", f"--mask-feats={p['masks']}", f"--prompt-feats={p['prompts']}",
         "--top-k=20", "--eval-batch-size=32", f"--output-images={i2t}", f"--output-texts={t2i}"],
        [str(eval_dir / "eval_back_retrieval.py"), str(p["test_images"]), str(i2t), str(p["test_texts"]),
         str(t2i), str(i2t_tbr), str(t2i_tbr)],
        [str(eval_dir / "evaluation.py"), str(p["test_texts"]), str(t2i_tbr),
         str(out / "text_output_mask+prompt_rerank.json"), "query_id"],
        [str(eval_dir / "evaluation.py"), str(p["test_images"]), str(i2t_tbr),
         str(out / "image_output_mask+prompt_rerank.json"), "image_id"],
    ]  # fmt: skip
    return sum((timed([*shim, *step], log) for step in steps), Seconds(0, 0))


def evaluate_command(
    p: dict[str, Path],
    cache: Path,
    *more: str,
    multirun: bool = False,
    method: str = "agree",
    rerank: str = "egr_tbr",
) -> list[str]:
    """``python -m agree.evaluate`` on the feature files, the cache of parsed files in ``cache``."""
    return [
        sys.executable, "-m", "agree.evaluate", *(["-m"] if multirun else []), f"method={method}",
        f"rerank={rerank}", f"cache_dir={cache}",
        f"annotations.images={p['test_images']}", f"annotations.texts={p['test_texts']}",
        f"annotations.text_segs={p['text_segs']}", f"features.image_jsonl={p['images']}",
        f"features.text_jsonl={p['texts']}", f"features.prompt_jsonl={p['prompts']}",
        f"features.mask_jsonl={p['masks']}", *more,
    ]  # fmt: skip


def our_side(p: dict[str, Path], cache: Path, out: Path, *more: str) -> Seconds:
    """One ``python -m agree.evaluate`` process writing into ``out``; its time."""
    return timed(evaluate_command(p, cache, f"output_dir={out}", *more), out.parent / "ours.log")


def median(run: Callable[[], Seconds], runs: int = 3) -> Seconds:
    """The run of median wall time of ``runs`` calls of ``run``."""
    return sorted((run() for _ in range(runs)), key=lambda s: s.wall)[runs // 2]


def sweep_and_single_runs(p: dict[str, Path], cache: Path, folder: Path) -> tuple[Seconds, Seconds]:
    """Times of the 20 EGR settings of ``SWEEP`` as one multirun and as 20 processes (the default
    ``method=agree``: EGR in float32)."""
    log = folder / "sweep.log"
    settings = f"rerank.text_to_image.raw_weight={SWEEP}"
    sweep_dir = f"hydra.sweep.dir={folder / 'sweep'}"
    sweep = timed(evaluate_command(p, cache, settings, sweep_dir, multirun=True), log)
    single = sum(
        (
            timed(
                evaluate_command(
                    p,
                    cache,
                    f"rerank.text_to_image.raw_weight={w}",
                    f"output_dir={folder / w}",
                ),
                log,
            )
            for w in SWEEP.split(",")
        ),
        Seconds(0, 0),
    )
    return sweep, single


def same_outputs(first: Path, second: Path) -> list[str]:
    """The output files (predictions, evaluation, results) that differ between two runs."""
    names = ["results.json"] + [
        f"{kind}/{path.name}" for kind in ("predictions", "evaluation") for path in (first / kind).iterdir()
    ]
    return [name for name in names if (first / name).read_bytes() != (second / name).read_bytes()]


# two candidates whose final EGR scores differ by less than this are a near-tie: where the two sides'
# similarities round differently (another BLAS kernel, a GPU), such a pair may come out in either order
NEAR_TIE = 1e-6
AIM = 60  # the second run's whole process against the release's scripts


def _egr_scores(path: Path) -> dict[str, dict[str, float]]:
    """The release's EGR file: query -> {item: final score} (its items are [id, raw, mid, final])."""
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return {str(r.get("query_id", r.get("image_id"))): {str(i[0]): i[3] for i in r["item_ids"]} for r in rows}


def compare(release_out: Path, ours: Path) -> tuple[list[str], int]:
    """(differences between the two sides, near-ties): EGR lists may differ only by swapping
    near-tied candidates; TBR lists and recalls only where such swaps happened."""
    problems, near_ties = [], 0
    for stage, suffix in STAGES.items():
        for direction, name in (("text_to_image", "texts"), ("image_to_text", "images")):
            release_file = release_out / f"test_{name}_predictions_mask+prompt{suffix}.jsonl"
            theirs = {p.query_id: p.item_ids for p in read_predictions(release_file)[1]}
            mine = {
                p.query_id: p.item_ids
                for p in read_predictions(ours / "predictions" / f"{stage}_{direction}.jsonl")[1]
            }
            differing = [q for q in theirs.keys() | mine.keys() if theirs.get(q) != mine.get(q)]
            if stage == "egr" and differing:
                scores = _egr_scores(release_file)
                for q in differing:
                    swapped = [a for a, b in zip(theirs[q], mine.get(q, ()), strict=False) if a != b]
                    final = [scores[q].get(item, float("inf")) for item in swapped]
                    if set(theirs[q]) == set(mine.get(q, ())) and max(final) - min(final) < NEAR_TIE:
                        near_ties += 1
                    else:
                        problems.append(f"egr {direction} query {q}: release {theirs[q]}, ours {mine.get(q)}")
            elif differing and not near_ties:
                problems.append(f"{stage} {direction}: {len(differing)} of {len(mine)} lists differ")
    for direction, name in (("text_to_image", "text"), ("image_to_text", "image")):
        theirs = json.loads((release_out / f"{name}_output_mask+prompt_rerank.json").read_text())["scoreJson"]
        mine = json.loads((ours / "evaluation" / f"egr_tbr_{direction}.json").read_text())["scoreJson"]
        if not near_ties and any(abs(theirs[k] - mine[k]) > 1e-9 for k in ("r1", "r5", "r10")):
            problems.append(f"recalls {direction}: release {theirs}, ours {mine}")
    return problems, near_ties


def against_transcription(paths: dict[str, Path], out: Path) -> None:
    """``agree.evaluate rerank=egr`` under each method against the test's transcription of the
    release's EGR script, on the files of ``paths``: differing lists, recalls, wall times."""
    from tests.test_reference_method import release_egr, release_recalls

    features = [
        read_feature_jsonl(paths[name], key) for name, key in (("texts", "query_id"), ("images", "image_id"))
    ]
    features += [read_entity_feature_jsonl(paths[name], SLOTS)[:2] for name in ("prompts", "masks")]
    start = time.perf_counter()
    release = release_egr(*features, k=20)
    print(
        f"    the transcription (per-query products, Python-float sums): {time.perf_counter() - start:.1f} s"
    )
    truth = {
        direction: {
            int(r[key]): [int(i) for i in r["item_ids"]]
            for r in map(json.loads, path.read_text().splitlines())
        }
        for direction, path, key in (
            ("text_to_image", paths["test_texts"], "query_id"),
            ("image_to_text", paths["test_images"], "image_id"),
        )
    }
    for method in ("reference", "agree"):
        folder = out / method
        command = evaluate_command(paths, out / "cache", f"output_dir={folder}", method=method, rerank="egr")
        seconds = timed(command, out / "ours.log").wall
        differ, recalls = [], []
        for direction, theirs in release.items():
            rows = read_predictions(folder / "predictions" / f"egr_{direction}.jsonl")[1]
            mine = {int(p.query_id): [int(i) for i in p.item_ids] for p in rows}
            differ.append(f"{sum(mine[q] != r for q, r in theirs.items())} of {len(theirs)} {direction}")
            expected = release_recalls(truth[direction], theirs)  # evaluation.py's formula
            written = json.loads((folder / "evaluation" / f"egr_{direction}.json").read_text())["scoreJson"]
            recalls.append(all(abs(written[k] - expected[k]) < 1e-9 for k in expected))
            recalls[-1] &= release_recalls(truth[direction], mine) == expected
        same = "the same recalls" if all(recalls) else "other recalls"
        print(f"    method={method} ({seconds:.1f} s): EGR lists differing from the transcription: "
              f"{', '.join(differ)}; {same}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release-dir", type=Path, default=os.environ.get("AGREE_RELEASE_DIR"),
                        help="examples/agree of an EasyNLP checkout (or AGREE_RELEASE_DIR)")  # fmt: skip
    parser.add_argument("--full", action="store_true", help="Flickr30k test size (1,000 x 5,000)")
    parser.add_argument("--transcription", action="store_true",
                        help="compare with the test's transcription of the release's EGR script")  # fmt: skip
    parser.add_argument("--run-release", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_release:
        run_release(args.run_release[0], args.run_release[1:])
        return
    release = args.release_dir
    if release is not None and not (release / "eval" / "evaluation.py").is_file():
        raise SystemExit(
            f"--release-dir {release}: no eval/evaluation.py (examples/agree of an EasyNLP checkout)"
        )
    n_images = 1000 if args.full else 200
    if args.transcription:
        print(f"EGR against the transcription: {n_images:,} images x {5 * n_images:,} captions x {SLOTS}")
        with tempfile.TemporaryDirectory() as tmp:
            against_transcription(write_inputs(Path(tmp), n_images, 5 * n_images), Path(tmp))
        return
    print(
        f"release side by side: {n_images:,} images x {5 * n_images:,} captions x {SLOTS} entities, {DIM}-d"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_inputs(tmp, n_images, 5 * n_images)
        size = sum(paths[n].stat().st_size for n in FEATURES) / 1e9
        print(f"    {size:.2f} GB of JSONL features")
        theirs = None
        if release is None:
            print("    the release's scripts: skipped (give --release-dir PATH/EasyNLP/examples/agree)")
        else:
            (tmp / "release").mkdir()
            theirs = release_side(release.resolve(), paths, tmp / "release")
            print(f"    the release's scripts (parse, search, EGR, TBR, recalls): {theirs}")
        cache = tmp / "cache"
        runs = {
            "first": our_side(paths, cache, tmp / "first"),
            "second": median(lambda: our_side(paths, cache, tmp / "second")),
            "reference": our_side(paths, cache, tmp / "reference", "method=reference"),
        }
        for run, what in (
            ("first", "parses, fills the cache"),
            ("second", "reads the cache; median of 3"),
            ("reference", "reads the cache, method=reference: the release's arithmetic"),
        ):
            faster = f": {ratio(theirs, runs[run])} faster" if theirs else ""
            print(f"    python -m agree.evaluate, {run} run ({what}): {runs[run]}{faster}")
        if theirs and args.full:  # the aim is at Flickr30k size, where the release's loops dominate
            met = "met" if theirs.wall >= AIM * runs["second"].wall else "NOT met"
            print(f"    aim, the second run's whole process {AIM}x faster than the release's: {met}")
            torch_alone = median(lambda: timed([sys.executable, "-c", "import torch"], tmp / "ours.log"))
            print(
                f"    a process that only imports torch (median of 3): {torch_alone}; the release's time over"
                f" it: {theirs.wall / torch_alone.wall:.0f}x, the most a process importing torch can reach"
            )
        start = time.perf_counter()
        for name in FEATURES:
            file_digest(paths[name])
        hashing = time.perf_counter() - start
        saved = runs["first"].cpu - runs["second"].cpu  # the parse (and the writing of the entries)
        print(
            f"    hashing the 4 files, the key (every run): {hashing:.2f} s ({size / hashing:.1f} GB/s);"
            f" the parse it saves (first - second run, CPU time): {saved:.1f} s"
        )
        sweep, single = sweep_and_single_runs(paths, cache, tmp)
        print(
            f"    20 EGR settings (rerank.text_to_image.raw_weight): one sweep (-m, 1 process) {sweep},"
            f" 20 single runs {single}: {ratio(single, sweep)}"
        )
        problems = [
            f"second run's {name} differs from the first's"
            for name in same_outputs(tmp / "first", tmp / "second")
        ]
        near_ties = 0
        if release is not None:
            found, near_ties = compare(tmp / "release", tmp / "second")
            problems += found
            found, reference_ties = compare(tmp / "release", tmp / "reference")
            problems += [f"method=reference: {problem}" for problem in found]
            problems += [f"method=reference: {reference_ties} near-ties swapped"] if reference_ties else []
        if problems:
            raise SystemExit("the runs differ: " + "; ".join(problems))
        ties = (
            f", but for {near_ties} swaps of near-tied candidates (< {NEAR_TIE:g}) under method=agree"
            if near_ties
            else ""
        )
        sides = "both sides and every run" if release is not None else "both runs"
        print(f"    the same EGR and TBR top-20 lists and the same recalls on {sides}{ties}")


if __name__ == "__main__":
    main()
