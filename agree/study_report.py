"""docs/results.md from the records of ``agree.study``: pure functions, no I/O."""

from __future__ import annotations

import statistics

from agree.summary import DIRECTIONS, SHORT

STAGE_NAMES = {"raw": "raw", "egr": "+EGR", "tbr": "+TBR", "egr_tbr": "+EGR+TBR"}
COLUMNS = [(d, k) for d in DIRECTIONS for k in ("r1", "r5", "r10")]


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` with one decimal."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def _row(label: str, blocks: list[dict]) -> str:
    cells = [mean_std([b[d][k] for b in blocks]) for d, k in COLUMNS]
    return f"| {label} | " + " | ".join(cells) + f" | **{mean_std([b['rsum'] for b in blocks])}** |"


def table(rows: list[tuple[str, list[dict]]]) -> str:
    """Markdown table, one row per (label, stage blocks over seeds)."""
    head = "| | " + " | ".join(f"{SHORT[d]} R@{k[1:]}" for d, k in COLUMNS) + " | RSUM |"
    return "\n".join([head, "|---" * (len(COLUMNS) + 2) + "|", *(_row(label, b) for label, b in rows)])


def _runs(records: list[dict], losses: str, lr: float, drop: str | None = None) -> list[dict]:
    return sorted(
        (r for r in records if r["losses"] == losses and r["lr"] == lr and r["drop"] == drop),
        key=lambda r: r["seed"],
    )


def paired(a: list[dict], b: list[dict], stage: str) -> list[float]:
    """Per seed RSUM of ``a`` minus that of ``b`` (both sorted by seed, same seeds)."""
    assert [r["seed"] for r in a] == [r["seed"] for r in b], "paired runs need the same seeds"
    return [x["test"][stage]["rsum"] - y["test"][stage]["rsum"] for x, y in zip(a, b, strict=True)]


def verdict(diffs: list[float]) -> str:
    """Whether a paired difference is clear of zero (mean beyond two standard errors)."""
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    if abs(mean) <= 2 * se:
        return "within noise (mean within 2 standard errors of 0)"
    return "clearly positive" if mean > 0 else "clearly negative"


def _diff_line(label: str, diffs: list[float]) -> str:
    per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
    return f"| {label} | {mean_std(diffs)} | {per_seed} | {verdict(diffs)} |"


def loss_activity(agree_runs: list[dict], weights: dict[str, float]) -> str:
    """Per loss of the full AGREE runs: weight, value at the first and last steps, weighted last value."""
    lines = [
        "| loss | weight | first step | last 5 steps | weight × first | weight × last |",
        "|---|---|---|---|---|---|",
    ]
    for name, weight in weights.items():
        first = [r["train_losses"][name]["first"] for r in agree_runs]
        last = [r["train_losses"][name]["last"] for r in agree_runs]
        lines.append(
            f"| {name} | {weight:g} | {mean_std3(first)} | {mean_std3(last)} | "
            f"{mean_std3([weight * v for v in first])} | {mean_std3([weight * v for v in last])} |"
        )
    return "\n".join(lines)


def mean_std3(values: list[float]) -> str:
    """``mean ± sample std`` with three significant digits."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {std:.2g}"


def reading(
    study: dict, zero: list[dict], egr: list[float], agree_clip: list[float], agree: list[dict]
) -> str:
    """The page's reading: what the numbers say, and what the data offers each loss."""
    zero_rsum = statistics.fmean(r["test"]["raw"]["rsum"] for r in zero)
    quiet = [
        name
        for name in ("text_mask", "vg_mask", "ground_mask")
        if name in study["loss_weights"]
        and statistics.fmean(r["train_losses"][name]["last"] for r in agree) < 1e-3
    ]
    outcome = {
        "clearly positive": "AGREE beats CLIP-only fine-tuning here.",
        "clearly negative": "AGREE does **not** beat CLIP-only fine-tuning here: it is worse.",
    }.get(
        verdict(agree_clip),
        "AGREE does **not** beat CLIP-only fine-tuning here: the difference is within noise.",
    )
    lines = [
        f"- The pretrained model is far above chance zero-shot (raw RSUM {zero_rsum:.1f} against "
        f"{study['chance_rsum']:.1f} for a random ranking), with R@1 held down by binding: each test "
        "image has siblings with the same shapes and colours bound differently, which a bag of objects "
        "cannot tell apart.",
        f"- EGR zero-shot: {mean_std(egr)} RSUM, {verdict(egr)}.",
        f"- After fine-tuning: AGREE − CLIP-only = {mean_std(agree_clip)} RSUM (raw), {verdict(agree_clip)}. "
        + outcome,
        "- What the data offers each loss: the entity losses contrast a caption with its entity-masked "
        "copies (`text_mask`), an image with copies where one grounded object is blanked (`ground_mask`), "
        "and Visual-Genome-style images of one shape with their shape word (`vg_contrast`, `vg_mask`; the "
        "bank names shapes only, not colours). Each teaches that an entity is *present*, which the "
        'pretrained model already knows; none contrasts a binding with its swap ("a red circle left of a '
        'blue square" against "a blue circle left of a red square"), the errors left at R@1. The '
        '`prompt` loss pulls an image towards "a photo containing a red circle", a phrase that also '
        "fits its binding siblings.",
    ]
    start = {
        name: weight * statistics.fmean(r["train_losses"][name]["first"] for r in agree)
        for name, weight in study["loss_weights"].items()
    }
    loudest = max(start, key=start.get)
    if loudest != "clip":
        lines.append(
            f"- Scale: at the first step the largest weighted term is `{loudest}` "
            f"({start[loudest]:.3g}, against {start['clip']:.3g} for `clip`), so early fine-tuning follows "
            "it more than the retrieval loss; the reference weights were set for batches of 32 captions of "
            "Flickr30k and a ViT-L/14, not for this model and data."
        )
    for drop in dict.fromkeys(r["drop"] for r in study["ablation"]):
        diffs = paired(_runs(study["ablation"], "agree", study["chosen_lr"]["agree"], drop), agree, "raw")
        if not verdict(diffs).startswith("within"):
            effect = "helps" if verdict(diffs) == "clearly positive" else "hurts"
            lines.append(
                f"- Ablation: removing `{drop}` {effect} ({mean_std(diffs)} RSUM against full AGREE)."
            )
    if quiet:
        lines.append(
            "- At the end of fine-tuning these margin losses are (almost) zero: "
            f"{', '.join(f'`{q}`' for q in quiet)}; "
            "with margin 0 every positive already beats its masked negative, so they give (almost) no "
            "gradient at this scale; a positive margin (`loss_options.margin`) would make them act."
        )
    return "\n".join(lines)


def _ablated(weights: dict[str, float], ablation: list[dict]) -> str:
    """Which losses the ablation covers, and which it left out."""
    done = list(dict.fromkeys(r["drop"] for r in ablation))
    missing = [name for name in weights if name not in done]
    return f"Ablated: {', '.join(done) or 'none'}." + (
        f" Not ablated in this run: {', '.join(missing)} (`drop`)." if missing else ""
    )


def results_page(study: dict, meta: dict) -> str:
    """The whole page: header, zero-shot, fine-tuning, paired differences, ablation, selection."""
    zero = sorted(study["zero_shot"], key=lambda r: r["seed"])
    tuned, ablation = study["fine_tuned"], study["ablation"]
    lr = study["chosen_lr"]
    clip, agree = _runs(tuned, "clip", lr["clip"]), _runs(tuned, "agree", lr["agree"])
    seeds = [r["seed"] for r in zero]
    sc = study["scenes"]
    egr_diffs = [r["test"]["egr"]["rsum"] - r["test"]["raw"]["rsum"] for r in zero]
    lines = [
        "# Results on the embedded scenes data",
        "",
        "Written by `agree.study` from its own outputs; do not edit by hand.",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- wall time: {meta['wall_seconds'] / 60:.1f} min for this invocation (runs already done under "
        "`output_dir` are reused) "
        f"(fine-tuning runs: {sum(r['train_seconds'] for r in tuned + ablation) / 60:.1f} min in all)",
        f"- data: the embedded scenes, {sc['train_images']} train / {sc['val_images']} val / "
        f"{sc['test_images']} test images, {sc['captions_per_image']} captions each, "
        f"{sc['binding_variants']} binding variants per group; model: the tiny model "
        "pretrained on the alt-text corpus (`model=scenes_pretrained`), fine-tuned one epoch, batch 32",
        f"- seeds: {seeds} (each seeds both the generated scenes and the training); "
        "mean ± sample standard deviation over seeds; recalls in %, test split",
        "",
        "## Reading",
        "",
        reading(study, zero, egr_diffs, paired(agree, clip, "raw"), agree),
        "",
        "## Zero-shot: the pretrained model, re-ranked (k = 20)",
        "",
        table([(f"zero-shot {STAGE_NAMES[s]}", [r["test"][s] for r in zero]) for s in STAGE_NAMES]),
        "",
        "## Fine-tuned at the same steps, each at its learning rate chosen on validation (TBR k = 10)",
        "",
        table(
            [
                (f"CLIP-only (lr {lr['clip']:g}) {STAGE_NAMES[s]}", [r["test"][s] for r in clip])
                for s in ("raw", "tbr")
            ]
            + [
                (f"AGREE (lr {lr['agree']:g}) {STAGE_NAMES[s]}", [r["test"][s] for r in agree])
                for s in ("raw", "tbr")
            ]
        ),
        "",
        "## Paired differences (RSUM, per seed)",
        "",
        "| difference | mean ± std | per seed | reading |",
        "|---|---|---|---|",
        _diff_line("zero-shot: EGR − raw", egr_diffs),
        _diff_line(
            "zero-shot: TBR − raw", [r["test"]["tbr"]["rsum"] - r["test"]["raw"]["rsum"] for r in zero]
        ),
        _diff_line("fine-tuned: AGREE − CLIP-only (raw)", paired(agree, clip, "raw")),
        _diff_line("fine-tuned: AGREE − CLIP-only (+TBR)", paired(agree, clip, "tbr")),
        _diff_line(
            "fine-tuned AGREE − zero-shot (raw)",
            [a["test"]["raw"]["rsum"] - z["test"]["raw"]["rsum"] for a, z in zip(agree, zero, strict=True)],
        ),
        "",
        f"## Ablation: AGREE without each loss (lr {lr['agree']:g}, raw search)",
        "",
        _ablated(study["loss_weights"], ablation),
        "",
        table(
            [("full AGREE", [r["test"]["raw"] for r in agree])]
            + [
                (f"w/o {drop}", [r["test"]["raw"] for r in _runs(ablation, "agree", lr["agree"], drop)])
                for drop in dict.fromkeys(r["drop"] for r in ablation)
            ]
        ),
        "",
        "| difference | mean ± std | per seed | reading |",
        "|---|---|---|---|",
        *(
            _diff_line(
                f"w/o {drop} − full AGREE", paired(_runs(ablation, "agree", lr["agree"], drop), agree, "raw")
            )
            for drop in dict.fromkeys(r["drop"] for r in ablation)
        ),
        "",
        "## What each loss does during AGREE fine-tuning (training loss, unweighted, mean ± std over seeds)",
        "",
        "A margin loss at 0 has no active pair (every positive already beats its negative by the",
        "margin) and so gives no gradient. The margin losses are summed over the batch (as the",
        "reference), the InfoNCE losses averaged: compare the weighted columns.",
        "",
        loss_activity(agree, study["loss_weights"]),
        "",
        "## Learning-rate selection (mean validation RSUM over seeds)",
        "",
        "| losses | lr | validation RSUM | chosen |",
        "|---|---|---|---|",
        *(
            f"| {losses} | {rate:g} | {mean_std([r['val_rsum'] for r in _runs(tuned, losses, rate)])} | "
            f"{'yes' if rate == lr[losses] else ''} |"
            for losses in ("clip", "agree")
            for rate in sorted({r["lr"] for r in tuned})
        ),
        "",
    ]
    return "\n".join(lines)
