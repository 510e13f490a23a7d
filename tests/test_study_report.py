"""The study page and the demo table: computed from records, paired per seed, 95 % CIs, chance exact."""

import json
import math
import random
import statistics
from dataclasses import asdict

import pytest

from agree.study import RECORD_FORMAT, Run, choose_lr, choose_reduction, main
from agree.study_report import T_975, draw_figures, figure_paths, interval, paired, results_page, verdict
from agree.summary import chance_rsum, demo_problems, summary_row

SEEDS, SIZES, MIDDLE = [0, 1, 2], [8, 16, 32], 16
LR = {"clip": 1e-4, "agree": 3e-4}
META = {"command": "python -m agree.study seeds=[0,1,2]", "machine": "test", "wall_seconds": 600}


def block(rsum_shift: float) -> dict:
    r = {"r1": 10 + rsum_shift / 6, "r5": 20 + rsum_shift / 6, "r10": 30 + rsum_shift / 6}
    r["mean_recall"] = sum(r.values()) / 3
    return {"text_to_image": dict(r), "image_to_text": dict(r), "rsum": 120 + rsum_shift}


def record(run: Run, shift: float, val: float = 100.0, probe: float = 0.5) -> dict:
    return {
        **asdict(run),
        "val_rsum": val,
        "test": {"raw": block(shift), "tbr": block(shift + 1)},
        "probe": {"swap_accuracy": probe, "n": 10},
        "steps": 3,
        "train_seconds": 10.0,
        "cpu_seconds": 15.0,
        "train_curves": {"clip": [3.0, 2.5, 2.0], "text_mask": [0.0, 0.0, 0.0]},
    }


def agree_gain(regime: str, size: int, seed: int) -> float:
    """AGREE − CLIP-only of the made-up records: positive in the neglect regime, largest when scarce."""
    return (40 / size) * (seed + 4) if regime == "neglect" else seed - 1.0


def study() -> dict:
    runs = []
    for regime in ("binding", "neglect"):
        for s in SEEDS:
            for size in SIZES:
                runs.append(record(Run(regime, s, size, "clip", LR["clip"]), shift=size + s))
                gain = agree_gain(regime, size, s)
                runs.append(
                    record(Run(regime, s, size, "agree", LR["agree"]), shift=size + s + gain, val=110)
                )
            for losses, chosen in LR.items():  # the rates not chosen
                for rate in {1e-4, 3e-4, 1e-3} - {chosen}:
                    runs.append(record(Run(regime, s, MIDDLE, losses, rate), shift=0, val=90))
            agree = Run(regime, s, MIDDLE, "agree", LR["agree"])
            runs.append(record(Run(**{**asdict(agree), "reduction": "mean"}), shift=MIDDLE + s + 1, val=105))
            runs.append(record(Run(**{**asdict(agree), "method": "reference"}), shift=MIDDLE - 10 + s))
            runs.append(
                record(Run(regime, s, MIDDLE, "clip", LR["clip"], swaps=True), MIDDLE + s, probe=0.6 + s / 50)
            )
            runs.append(record(Run(**{**asdict(agree), "swaps": True}), MIDDLE + s, probe=0.7))
            if regime == "neglect":
                runs.append(record(Run(**{**asdict(agree), "drop": "prompt"}), shift=MIDDLE + s - 9))
    zero = [
        {
            "regime": regime,
            "seed": s,
            "test": {
                "raw": block(-50 + s),
                "egr": block(-48 + 2 * s),
                "tbr": block(-49),
                "egr_tbr": block(-47),
            },
            "probe": {"swap_accuracy": 0.5, "n": 10},
        }
        for regime in ("binding", "neglect")
        for s in SEEDS
    ]
    return {
        "format": RECORD_FORMAT,
        "zero_shot": zero,
        "runs": runs,
        "chosen": {"lr": {"binding": LR, "neglect": LR}, "reduction": "sum"},
        "loss_weights": {"clip": 0.9, "text_mask": 0.1},
        "chance_rsum": 30.0,
        "plan": {
            "seeds": SEEDS,
            "regimes": ["binding", "neglect"],
            "sizes": SIZES,
            "steps": 3,
            "val_images": 6,
            "test_images": 6,
            "lrs": [1e-4, 3e-4, 1e-3],
            "lr_seeds": SEEDS,
        },
        "middle": MIDDLE,
        "epochs": {"8": 3, "16": 2, "32": 1},
    }


def ci_by_hand(values: list[float]) -> str:
    scipy_stats = pytest.importorskip("scipy.stats")
    mean = statistics.fmean(values)
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def test_t_quantiles_are_students():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df, t in enumerate(T_975, start=1):
        assert t == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3), df


def test_interval_and_the_plans_decision_rule():
    mean, low, high = interval([5.0, 6.0, 7.0])
    half = 4.303 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((6.0, 6.0 - half, 6.0 + half), abs=1e-3)
    assert verdict([5.0, 6.0, 7.0]) == "helps"
    assert verdict([-5.0, -6.0, -7.0]) == "hurts"
    assert verdict([-3.0, 4.0, 0.5]) == "inconclusive"
    assert verdict([1.0, 1.1, 40.0]) == "inconclusive"  # positive mean, interval across 0
    assert verdict([3.0]) == "inconclusive"  # one seed has no interval


def test_paired_differences_are_per_seed_and_need_the_same_seeds():
    runs = study()["runs"]
    agree = [r for r in runs if r["regime"] == "binding" and r["size"] == 8 and r["losses"] == "agree"]
    clip = [r for r in runs if r["regime"] == "binding" and r["size"] == 8 and r["losses"] == "clip"]
    agree, clip = [sorted(x, key=lambda r: r["seed"]) for x in (agree, clip)]
    assert paired(agree, clip) == pytest.approx([agree_gain("binding", 8, s) for s in SEEDS])
    with pytest.raises(ValueError, match="same seeds"):
        paired(agree[:2], clip[1:])


def test_learning_rate_and_margin_reduction_are_chosen_on_validation():
    s = study()
    middle = [
        r for r in s["runs"] if r["regime"] == "binding" and r["size"] == MIDDLE and r["method"] == "agree"
    ]
    agree_runs = [r for r in middle if r["losses"] == "agree" and r["reduction"] == "sum" and not r["swaps"]]
    assert choose_lr([r for r in agree_runs if r["drop"] is None]) == LR["agree"]
    sums = [{"val_rsum": v} for v in (100.0, 102.0)]
    assert choose_reduction(sums, [{"val_rsum": v} for v in (101.0, 101.4)]) == "sum"  # within the tie
    assert choose_reduction(sums, [{"val_rsum": v} for v in (103.0, 101.0)]) == "mean"


def test_page_holds_both_regimes_the_curve_every_row_and_the_intervals():
    s = study()
    page = results_page(s, META, {"test RSUM against training-set size": "results-learning-curve.png"})
    assert "## Regime: binding" in page and "## Regime: neglect" in page
    assert "[study-plan.md](study-plan.md)" in page and "`python -m agree.study seeds=[0,1,2]`" in page
    assert "![test RSUM against training-set size](results-learning-curve.png)" in page
    for label in (
        "zero-shot raw",
        "zero-shot +EGR+TBR",
        "CLIP-only (lr 0.0001) raw",
        "AGREE (lr 0.0003, sum) +TBR",
        "AGREE, margin_reduction=mean",
        "AGREE, method=reference",
        "CLIP-only + swaps",
        "AGREE + swaps",
        "w/o prompt",
    ):
        assert f"| {label} |" in page, label
    for regime in ("binding", "neglect"):
        for size in SIZES:
            gains = [agree_gain(regime, size, seed) for seed in SEEDS]
            assert f"| {size} images: AGREE − CLIP-only (raw) | {ci_by_hand(gains)} |" in page
    neglect = [agree_gain("neglect", 8, seed) for seed in SEEDS]
    assert f"8 images: {ci_by_hand(neglect)}, helps" in page  # H1 at the smallest size
    assert "**neglect, H2**" in page and "larger when data is scarce" in page
    assert "**binding, H3**" in page
    fixed = ci_by_hand([MIDDLE + s + agree_gain("binding", MIDDLE, s) - (MIDDLE - 10 + s) for s in SEEDS])
    assert f"{MIDDLE} images): {fixed}, helps." in page.split("**binding, H4**")[1].splitlines()[0]
    probe_gain = ci_by_hand([10 + 2 * seed for seed in SEEDS])  # CLIP-only + swaps: 60 + 2s % against 50 %
    assert f"CLIP-only + swaps − CLIP-only: probe accuracy (points) | {probe_gain} |" in page
    assert "| neglect | agree, margin_reduction=mean | 105.0 ± 0.0 |  |" in page
    assert "| binding | clip, lr 0.0001 | 100.0 ± 0.0 | yes |" in page
    assert "removing `prompt` lowers RSUM" in page
    assert "| clip | 0.9 | 3 ± 0 | 2.5 ± 0 | 2.7 ± 0 | 2.25 ± 0 |" in page  # last 5 of [3, 2.5, 2]


def test_figures_are_png_files_beside_the_page(tmp_path):
    figures = figure_paths(tmp_path, "results")
    draw_figures(study(), figures)
    assert {p.name for p in figures.values()} == {"results-learning-curve.png", "results-training-losses.png"}
    for path in figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_only_rewrites_the_page_and_figures_from_saved_records(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({**study(), "meta": META}))
    main([f"output_dir={tmp_path}", f"doc={tmp_path / 'docs' / 'results.md'}", "render_only=true"])
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "`python -m agree.study seeds=[0,1,2]`" in page and "10.0 min for this invocation" in page
    assert (tmp_path / "docs" / "results-learning-curve.png").is_file()


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "study.json: not found; run the study first"),
        ("{not json", "study.json: cannot read it"),
        (json.dumps({"runs": []}), "not a record of this agree.study"),
        (
            json.dumps({"format": RECORD_FORMAT, "runs": [], "meta": META}),
            "study.json: incomplete or damaged",
        ),
        ("partial", "study.json: incomplete or damaged"),
    ],
)
def test_render_only_on_missing_or_damaged_records_is_one_line(tmp_path, monkeypatch, content, fragment):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    if content == "partial":  # a cell without its records
        s = study()
        s["runs"] = [r for r in s["runs"] if not (r["method"] == "reference" and r["seed"] == 1)]
        content = json.dumps({**s, "meta": META})
    if content is not None:
        (tmp_path / "study.json").write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as stop:
        main([f"output_dir={tmp_path}", f"doc={tmp_path / 'results.md'}", "render_only=true"])
    message = str(stop.value)
    assert message.startswith("config error: ") and "\n" not in message and fragment in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_chance_rsum_matches_a_random_ranking():
    images, per_image = 20, 5
    exact = chance_rsum(images, per_image)
    rng, hits, trials = random.Random(0), 0.0, 4000
    for _ in range(trials):
        order = rng.sample(range(images), images)
        captions = rng.sample(range(images * per_image), images * per_image)
        for k in (1, 5, 10):
            hits += 0 in order[:k]
            hits += any(c < per_image for c in captions[:k])
    assert exact == pytest.approx(100 * hits / trials, rel=0.05)
    assert exact == pytest.approx(
        100
        * (
            1 / 20
            + 5 / 20
            + 10 / 20
            + 1
            - math.comb(95, 1) / math.comb(100, 1)
            + 1
            - math.comb(95, 5) / math.comb(100, 5)
            + 1
            - math.comb(95, 10) / math.comb(100, 10)
        )
    )


def test_demo_problems_name_what_failed():
    zero, tuned = block(-100), block(0)
    rows = [summary_row("zero-shot", "none", "raw", zero), summary_row("fine-tuned", "agree", "raw", tuned)]
    assert demo_problems(rows, chance=5.0) == []
    assert "under 3.0 x chance" in demo_problems(rows, chance=10.0)[0]
    worse = [rows[0], summary_row("fine-tuned", "agree", "raw", block(-101))]
    assert "not above zero-shot" in demo_problems(worse, chance=5.0)[0]
    assert set(rows[0]) == {
        "model",
        "losses",
        "stage",
        "text_to_image",
        "image_to_text",
        "rsum",
        "swap_accuracy",
    }
    assert set(rows[0]["text_to_image"]) == {"r1", "r5", "r10", "mean_recall"}
