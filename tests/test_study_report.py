"""The study page and the demo table: computed from records, paired per seed, chance exact."""

import json
import math
import random

import pytest

from agree.study import choose_lr
from agree.study_report import paired, results_page, verdict
from agree.summary import chance_rsum, demo_problems, summary_row


def block(rsum_shift: float) -> dict:
    r = {"r1": 10 + rsum_shift / 6, "r5": 20 + rsum_shift / 6, "r10": 30 + rsum_shift / 6}
    r["mean_recall"] = sum(r.values()) / 3
    return {"text_to_image": dict(r), "image_to_text": dict(r), "rsum": 120 + rsum_shift}


def fine_tuned(seed, losses, lr, val, shift, drop=None):
    return {
        "seed": seed,
        "losses": losses,
        "lr": lr,
        "drop": drop,
        "val_rsum": val,
        "test": {"raw": block(shift), "tbr": block(shift + 1)},
        "train_seconds": 10.0,
        "train_losses": {"clip": {"first": 3.0, "last": 2.0}, "text_mask": {"first": 0.0, "last": 0.0}},
    }


def study():
    seeds = [0, 1, 2]
    tuned = [
        fine_tuned(s, "clip", lr, val=100 + 10 * (lr == 1e-4), shift=s) for s in seeds for lr in (1e-4, 3e-4)
    ]
    tuned += [
        fine_tuned(s, "agree", lr, val=100 + 10 * (lr == 3e-4), shift=2 * s + 5)
        for s in seeds
        for lr in (1e-4, 3e-4)
    ]
    ablation = [fine_tuned(s, "agree", 3e-4, 0, shift=s - 3, drop="prompt") for s in seeds]
    zero = [
        {
            "seed": s,
            "test": {"raw": block(-50), "egr": block(-48 + s), "tbr": block(-49), "egr_tbr": block(-47)},
        }
        for s in seeds
    ]
    return {
        "zero_shot": zero,
        "fine_tuned": tuned,
        "ablation": ablation,
        "chosen_lr": {"clip": 1e-4, "agree": 3e-4},
        "loss_weights": {"clip": 0.9, "text_mask": 0.1},
        "chance_rsum": 30.0,
        "scenes": {
            "train_images": 100,
            "val_images": 50,
            "test_images": 100,
            "captions_per_image": 5,
            "binding_variants": 3,
        },
    }


def test_learning_rate_is_chosen_on_validation():
    records = study()["fine_tuned"]
    assert choose_lr(records, "clip") == 1e-4 and choose_lr(records, "agree") == 3e-4


def test_paired_difference_is_per_seed_and_needs_the_same_seeds():
    s = study()
    agree = [r for r in s["fine_tuned"] if r["losses"] == "agree" and r["lr"] == 3e-4]
    clip = [r for r in s["fine_tuned"] if r["losses"] == "clip" and r["lr"] == 1e-4]
    assert paired(agree, clip, "raw") == pytest.approx([5, 6, 7])
    with pytest.raises(AssertionError):
        paired(agree[:2], clip[1:], "raw")


def test_verdict_separates_signal_from_noise():
    assert verdict([5.0, 6.0, 7.0]) == "clearly positive"
    assert verdict([-5.0, -6.0, -7.0]) == "clearly negative"
    assert verdict([-3.0, 4.0, 0.5]).startswith("within noise")
    assert "|" not in verdict([-3.0, 4.0, 0.5])


def test_page_holds_every_row_with_mean_and_std():
    page = results_page(study(), {"command": "python -m agree.study", "machine": "test", "wall_seconds": 60})
    for label in (
        "zero-shot raw",
        "zero-shot +EGR",
        "zero-shot +TBR",
        "zero-shot +EGR+TBR",
        "CLIP-only (lr 0.0001) raw",
        "AGREE (lr 0.0003) +TBR",
        "w/o prompt",
    ):
        assert f"| {label} |" in page, label
    assert "| fine-tuned: AGREE − CLIP-only (raw) | 6.0 ± 1.0 | +5.0, +6.0, +7.0 | clearly positive |" in page
    assert "| zero-shot: EGR − raw | 3.0 ± 1.0 |" in page
    assert "`python -m agree.study`" in page
    assert "| text_mask | 0.1 | 0 ± 0 | 0 ± 0 | 0 ± 0 | 0 ± 0 |" in page
    assert "| clip | 0.9 | 3 ± 0 | 2 ± 0 | 2.7 ± 0 | 1.8 ± 0 |" in page
    assert "AGREE beats CLIP-only fine-tuning here." in page
    assert "these margin losses are (almost) zero: `text_mask`" in page
    assert "- Ablation: removing `prompt` hurts (-9.0 ± 1.0 RSUM against full AGREE)." in page
    assert "raw RSUM 70.0 against 30.0 for a random ranking" in page
    assert "Ablated: prompt. Not ablated in this run: clip, text_mask (`drop`)." in page


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


def test_render_only_rewrites_the_page_from_saved_records(tmp_path):
    from agree.study import main

    meta = {"command": "python -m agree.study seeds=[0,1,2]", "machine": "test", "wall_seconds": 600}
    (tmp_path / "study.json").write_text(json.dumps({**study(), "meta": meta}))
    main([f"output_dir={tmp_path}", f"doc={tmp_path / 'results.md'}", "render_only=true"])
    page = (tmp_path / "results.md").read_text()
    assert "`python -m agree.study seeds=[0,1,2]`" in page and "10.0 min for this invocation" in page
