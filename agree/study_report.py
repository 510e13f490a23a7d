"""docs/results.md and its figures from the records of ``agree.study``: pure functions but the plots.

Every comparison is paired by seed and read as docs/study-plan.md says: the 95 % confidence
interval of the mean paired difference, ``mean ± t(0.975, n − 1) · sd / √n``; A helps when it lies
above 0, hurts when below, and is inconclusive otherwise.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from agree.report.plots import line_plot
from agree.summary import DIRECTIONS, SHORT

STAGE_NAMES = {"raw": "raw", "egr": "+EGR", "tbr": "+TBR", "egr_tbr": "+EGR+TBR"}
COLUMNS = [(d, k) for d in DIRECTIONS for k in ("r1", "r5", "r10")]
# t(0.975, df) for df = 1..30, two-sided 95 % (scipy is not a dependency); beyond 30, 1.96.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
REGIME_TEXT = {
    "binding": "a test image's siblings hold the same shapes and colours bound or placed differently",
    "neglect": "a test image's siblings share its large primary object and differ in the small secondary "
    "ones, which the pretrained model (alt-text naming the salient object only) neglects",
}


def t_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
    return T_975[df - 1] if df <= len(T_975) else 1.96


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % confidence interval of the mean (infinite for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("-inf"), float("inf")
    half = t_975(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def verdict(diffs: list[float]) -> str:
    """``helps`` (interval above 0), ``hurts`` (below 0) or ``inconclusive`` (the plan's rule)."""
    _, low, high = interval(diffs)
    return "helps" if low > 0 else "hurts" if high < 0 else "inconclusive"


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` with one decimal."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def ci_text(diffs: list[float]) -> str:
    """``+m.m [low, high]``."""
    mean, low, high = interval(diffs)
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def pick(runs: list[dict], **coords) -> list[dict]:
    """The runs with these coordinates, by seed (a ``Run``'s defaults fill the coordinates not given)."""
    wanted = {"reduction": "sum", "method": "agree", "swaps": False, "drop": None, **coords}
    return sorted((r for r in runs if all(r[k] == v for k, v in wanted.items())), key=lambda r: r["seed"])


def mean_val(records: list[dict]) -> float:
    return statistics.fmean(r["val_rsum"] for r in records)


def rsum(record: dict, stage: str = "raw") -> float:
    return record["test"][stage]["rsum"]


def probe(record: dict) -> float | None:
    """The binding probe's swap accuracy (%) of a record, or None without one."""
    found = record.get("probe")
    return None if not found else 100 * found["swap_accuracy"]


def paired(a: list[dict], b: list[dict], value=rsum) -> list[float]:
    """Per seed ``value(a) − value(b)``; both must hold the same seeds."""
    if [r["seed"] for r in a] != [r["seed"] for r in b] or not a:
        raise ValueError(
            f"paired runs need the same seeds, got {[r['seed'] for r in a]} and {[r['seed'] for r in b]}"
        )
    return [value(x) - value(y) for x, y in zip(a, b, strict=True)]


def table(rows: list[tuple[str, list[dict]]], with_probe: bool = True) -> str:
    """Markdown table, one row per (label, stage blocks over seeds, probes or None)."""
    head = "| | " + " | ".join(f"{SHORT[d]} R@{k[1:]}" for d, k in COLUMNS) + " | RSUM |"
    lines = [head + (" probe |" if with_probe else ""), "|---" * (len(COLUMNS) + 2 + with_probe) + "|"]
    for label, blocks, probes in rows:
        cells = [mean_std([b[d][k] for b in blocks]) for d, k in COLUMNS]
        line = f"| {label} | " + " | ".join(cells) + f" | **{mean_std([b['rsum'] for b in blocks])}** |"
        if with_probe:
            line += f" {mean_std(probes) if probes and None not in probes else '—'} |"
        lines.append(line)
    return "\n".join(lines)


def stage_row(label: str, records: list[dict], stage: str = "raw") -> tuple[str, list[dict], list]:
    return label, [r["test"][stage] for r in records], [probe(r) for r in records]


def diff_line(label: str, diffs: list[float]) -> str:
    per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
    return f"| {label} | {ci_text(diffs)} | {per_seed} | {verdict(diffs)} |"


DIFF_HEAD = ["| difference (RSUM unless said) | mean [95 % CI] | per seed | reading |", "|---|---|---|---|"]


class Regime:
    """The rows of one regime, picked from the study's records."""

    def __init__(self, study: dict, name: str):
        self.name, self.study = name, study
        self.runs = [r for r in study["runs"] if r["regime"] == name]
        self.zero = sorted((r for r in study["zero_shot"] if r["regime"] == name), key=lambda r: r["seed"])
        lr = study["chosen"]["lr"][name]
        self.reduction = study["chosen"]["reduction"]
        self.middle = study["middle"]
        self.sizes = sorted(study["plan"]["sizes"])
        self.lr = lr
        self.clip_coords = {"losses": "clip", "lr": lr["clip"]}
        self.agree_coords = {"losses": "agree", "lr": lr["agree"], "reduction": self.reduction}

    def clip(self, size: int, **extra) -> list[dict]:
        return pick(self.runs, size=size, **{**self.clip_coords, **extra})

    def agree(self, size: int, **extra) -> list[dict]:
        return pick(self.runs, size=size, **{**self.agree_coords, **extra})

    def reference(self) -> list[dict]:
        return self.agree(self.middle, reduction="sum", method="reference")

    def other_reduction(self) -> tuple[str, list[dict]]:
        other = "mean" if self.reduction == "sum" else "sum"
        return other, self.agree(self.middle, reduction=other)

    def zero_matching(self, records: list[dict]) -> list[dict]:
        seeds = {r["seed"] for r in records}
        return [z for z in self.zero if z["seed"] in seeds]

    def ablated(self) -> list[str]:
        return list(dict.fromkeys(r["drop"] for r in self.runs if r["drop"]))

    def has_swaps(self) -> bool:
        return any(r["swaps"] for r in self.runs)


def reading(study: dict, regimes: list[Regime]) -> list[str]:
    """The page's reading, hypothesis by hypothesis (docs/study-plan.md)."""
    lines = []
    for g in regimes:
        moved = {size: verdict(paired(g.clip(size), g.zero_matching(g.clip(size)))) for size in g.sizes}
        unmoved = [size for size, v in moved.items() if v != "helps"]
        lines.append(
            f"- **{g.name}, precondition**: CLIP-only fine-tuning beats zero-shot (interval above 0) at "
            + (
                "every size."
                if not unmoved
                else f"{', '.join(str(s) for s in moved if s not in unmoved) or 'no size'}; not at "
                f"{', '.join(map(str, unmoved))} training images, where the AGREE comparison is not read."
            )
        )
        diffs = {size: paired(g.agree(size), g.clip(size)) for size in g.sizes}
        per_size = "; ".join(f"{size} images: {ci_text(d)}, {verdict(d)}" for size, d in diffs.items())
        label = {"neglect": "H1", "binding": "H3"}.get(g.name, "AGREE")
        lines.append(f"- **{g.name}, {label}** (AGREE − CLIP-only, raw): {per_size}.")
        if len(g.sizes) > 1:
            gap = [a - b for a, b in zip(diffs[g.sizes[0]], diffs[g.sizes[-1]], strict=True)]
            lines.append(
                f"- **{g.name}, H2** (the gain at {g.sizes[0]} minus the gain at {g.sizes[-1]} images): "
                f"{ci_text(gap)}, {verdict(gap).replace('helps', 'larger when data is scarce')}."
            )
        fixed = paired(g.agree(g.middle, reduction="sum"), g.reference())
        lines.append(
            f"- **{g.name}, H4** (AGREE `method=agree` − `method=reference`, both summing the margin losses, "
            f"{g.middle} images): {ci_text(fixed)}, {verdict(fixed)}."
        )
        if g.has_swaps():
            for what, base in (("CLIP-only", g.clip), ("AGREE", g.agree)):
                with_swaps, without = base(g.middle, swaps=True), base(g.middle)
                gain, probed = paired(with_swaps, without), paired(with_swaps, without, probe)
                lines.append(
                    f"- **{g.name}, H5** ({what} + swaps − {what}): RSUM {ci_text(gain)}, {verdict(gain)}; "
                    f"probe accuracy (points) {ci_text(probed)}, {verdict(probed)}."
                )
        for drop in g.ablated():
            d = paired(g.agree(g.middle, drop=drop), g.agree(g.middle))
            if verdict(d) != "inconclusive":
                effect = "raises" if verdict(d) == "helps" else "lowers"
                lines.append(f"- {g.name}, ablation: removing `{drop}` {effect} RSUM ({ci_text(d)}).")
    sums = [r for g in regimes for r in g.agree(g.middle, reduction="sum")]
    means = [r for g in regimes for r in g.agree(g.middle, reduction="mean")]
    if sums and means:
        lines.append(
            f"- `loss_options.margin_reduction`: validation RSUM {mean_val(sums):.1f} (sum) against "
            f"{mean_val(means):.1f} (mean), pooled over regimes and seeds: "
            f"**{study['chosen']['reduction']}** is chosen (the plan's rule), used by every other AGREE row."
        )
    return lines


def regime_section(g: Regime, weights: dict[str, float], epochs: dict[str, int]) -> list[str]:
    """The tables of one regime."""
    curve_rows = []
    for size in g.sizes:
        clip, agree = g.clip(size), g.agree(size)
        zero = g.zero_matching(clip)
        curve_rows.append(
            f"| {size} ({epochs[str(size)]}) | {mean_std([rsum(z) for z in zero])} | "
            f"{mean_std([rsum(r) for r in clip])} | {mean_std([rsum(r) for r in agree])} | "
            f"{ci_text(paired(clip, zero))} | {ci_text(paired(agree, clip))} |"
        )
    other, other_runs = g.other_reduction()
    middle_rows = [
        stage_row(f"CLIP-only (lr {g.lr['clip']:g}) {STAGE_NAMES[s]}", g.clip(g.middle), s)
        for s in ("raw", "tbr")
    ] + [
        stage_row(f"AGREE (lr {g.lr['agree']:g}, {g.reduction}) {STAGE_NAMES[s]}", g.agree(g.middle), s)
        for s in ("raw", "tbr")
    ]
    middle_rows.append(stage_row(f"AGREE, margin_reduction={other}", other_runs))
    middle_rows.append(stage_row("AGREE, method=reference", g.reference()))
    if g.has_swaps():
        middle_rows.append(stage_row("CLIP-only + swaps", g.clip(g.middle, swaps=True)))
        middle_rows.append(stage_row("AGREE + swaps", g.agree(g.middle, swaps=True)))
    zero = g.zero
    diffs = [
        diff_line(f"zero-shot: {STAGE_NAMES[s]} − raw", [rsum(z, s) - rsum(z) for z in zero])
        for s in ("egr", "tbr", "egr_tbr")
    ]
    for size in g.sizes:
        clip, agree = g.clip(size), g.agree(size)
        diffs += [
            diff_line(f"{size} images: CLIP-only − zero-shot (raw)", paired(clip, g.zero_matching(clip))),
            diff_line(f"{size} images: AGREE − zero-shot (raw)", paired(agree, g.zero_matching(agree))),
            diff_line(f"{size} images: AGREE − CLIP-only (raw)", paired(agree, clip)),
            diff_line(
                f"{size} images: AGREE − CLIP-only (+TBR)", paired(agree, clip, lambda r: rsum(r, "tbr"))
            ),
        ]
    middle = g.agree(g.middle)
    diffs += [
        diff_line(
            "AGREE `method=agree` − `method=reference` (both sum)",
            paired(g.agree(g.middle, reduction="sum"), g.reference()),
        ),
        diff_line(f"AGREE {other} − {g.reduction} (margin_reduction)", paired(other_runs, middle)),
    ]
    if g.has_swaps():
        for what, base in (("CLIP-only", g.clip), ("AGREE", g.agree)):
            a, b = base(g.middle, swaps=True), base(g.middle)
            diffs += [
                diff_line(f"{what} + swaps − {what}", paired(a, b)),
                diff_line(f"{what} + swaps − {what}: probe accuracy (points)", paired(a, b, probe)),
            ]
    lines = [
        f"## Regime: {g.name}",
        "",
        f"{REGIME_TEXT.get(g.name, '')}. Learning rates chosen on validation: CLIP-only {g.lr['clip']:g}, "
        f"AGREE {g.lr['agree']:g}.",
        "",
        "### Zero-shot: the pretrained model, re-ranked (k = 20)",
        "",
        table([stage_row(f"zero-shot {STAGE_NAMES[s]}", zero, s) for s in STAGE_NAMES]),
        "",
        "### Learning curve (test RSUM, raw; mean ± std over seeds; differences paired, 95 % CI)",
        "",
        "| training images (epochs) | zero-shot | CLIP-only | AGREE | CLIP-only − zero-shot "
        "| AGREE − CLIP-only |",
        "|---|---|---|---|---|---|",
        *curve_rows,
        "",
        f"### Every row at {g.middle} training images (TBR k = 10; probe: swap accuracy, %)",
        "",
        table(middle_rows),
        "",
        "### Paired differences (per seed)",
        "",
        *DIFF_HEAD,
        *diffs,
    ]
    if g.ablated():
        lines += [
            "",
            f"### Ablation: AGREE without each loss ({g.middle} images, raw)",
            "",
            table(
                [stage_row("full AGREE", middle)]
                + [stage_row(f"w/o {drop}", g.agree(g.middle, drop=drop)) for drop in g.ablated()]
            ),
            "",
            *DIFF_HEAD,
            *(
                diff_line(f"w/o {drop} − full AGREE", paired(g.agree(g.middle, drop=drop), middle))
                for drop in g.ablated()
            ),
        ]
    lines += [
        "",
        f"### What each loss does during AGREE fine-tuning ({g.middle} images; unweighted, mean ± std)",
        "",
        loss_activity(middle, weights),
        "",
    ]
    return lines


def loss_activity(runs: list[dict], weights: dict[str, float]) -> str:
    """Per loss of AGREE runs: weight, value at the first step and over the last 5, weighted."""
    lines = [
        "| loss | weight | first step | last 5 steps | weight × first | weight × last |",
        "|---|---|---|---|---|---|",
    ]
    for name, weight in weights.items():
        if weight == 0 or not all(name in r["train_curves"] for r in runs):
            continue
        first = [r["train_curves"][name][0] for r in runs]
        last = [statistics.fmean(r["train_curves"][name][-5:]) for r in runs]
        lines.append(
            f"| {name} | {weight:g} | {mean_std3(first)} | {mean_std3(last)} | "
            f"{mean_std3([weight * v for v in first])} | {mean_std3([weight * v for v in last])} |"
        )
    return "\n".join(lines)


def mean_std3(values: list[float]) -> str:
    """``mean ± sample std`` with three significant digits."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {std:.2g}"


def selection(study: dict, regimes: list[Regime]) -> list[str]:
    """The learning-rate and margin-reduction choices, on validation."""
    seeds = study["plan"]["lr_seeds"]
    lines = [
        "## Choices made on validation",
        "",
        f"Learning rates: mean validation RSUM at {study['middle']} images over seeds {seeds}; "
        "`margin_reduction`: at AGREE's rate, pooled over regimes and every seed.",
        "",
        "| regime | run | validation RSUM | chosen |",
        "|---|---|---|---|",
    ]
    for g in regimes:
        for losses in ("clip", "agree"):
            for rate in study["plan"]["lrs"]:
                runs = [r for r in pick(g.runs, size=g.middle, losses=losses, lr=rate) if r["seed"] in seeds]
                chosen = "yes" if rate == g.lr[losses] else ""
                val = mean_std([r["val_rsum"] for r in runs])
                lines.append(f"| {g.name} | {losses}, lr {rate:g} | {val} | {chosen} |")
        for reduction in ("sum", "mean"):
            runs = g.agree(g.middle, reduction=reduction)
            chosen = "yes" if reduction == study["chosen"]["reduction"] else ""
            val = mean_std([r["val_rsum"] for r in runs])
            lines.append(f"| {g.name} | agree, margin_reduction={reduction} | {val} | {chosen} |")
    return lines


def results_page(study: dict, meta: dict, figures: dict[str, str]) -> str:
    """The whole page: header, reading, figures, one section per regime, the choices."""
    plan = study["plan"]
    regimes = [Regime(study, name) for name in plan["regimes"]]
    runs = study["runs"]
    epochs = ", ".join(f"{size}: {study['epochs'][str(size)]}" for size in sorted(plan["sizes"]))
    lines = [
        "# Results of the AGREE effect study on the embedded scenes",
        "",
        "Written by `agree.study` from its own records; do not edit by hand. The plan, committed before "
        "these results: [study-plan.md](study-plan.md).",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- wall time: {meta['wall_seconds'] / 60:.1f} min for this invocation (records already under "
        f"`output_dir` with the same parameters are reused); fine-tuning runs: "
        f"{sum(r['train_seconds'] for r in runs) / 60:.1f} min in all, {len(runs)} runs "
        f"({sum(r['cpu_seconds'] for r in runs) / 60:.1f} CPU-min with their test evaluations)",
        f"- data: the embedded scenes, regimes {', '.join(plan['regimes'])}; "
        f"{', '.join(map(str, plan['sizes']))} training images, {plan['val_images']} validation, "
        f"{plan['test_images']} test images (chance RSUM {study['chance_rsum']:.1f}); each run about "
        f"{plan['steps']} optimiser steps (epochs per size: {epochs}), validated once at the end; "
        "models: each regime's pretrained tiny model",
        f"- seeds: {plan['seeds']} (each seeds the data and the training); recalls in %, test split; mean ± "
        "sample std over seeds; differences paired by seed with their 95 % confidence interval "
        "(t distribution): *helps* above 0, *hurts* below 0, else *inconclusive*",
        "",
        "## Reading",
        "",
        *reading(study, regimes),
        "",
        "## Figures",
        "",
        *(f"![{name}]({path})" for name, path in figures.items()),
        "",
    ]
    for g in regimes:
        lines += regime_section(g, study["loss_weights"], study["epochs"])
    lines += [*selection(study, regimes), ""]
    return "\n".join(lines)


def curve_panels(study: dict) -> dict[str, dict[str, tuple]]:
    """Per regime: test RSUM against training-set size per method, with the 95 % interval band."""
    panels = {}
    for name in study["plan"]["regimes"]:
        g = Regime(study, name)
        lines = {}
        for label, runs_at in (("CLIP-only", g.clip), ("AGREE", g.agree)):
            stats = [interval([rsum(r) for r in runs_at(size)]) for size in g.sizes]
            lines[label] = (g.sizes, *(list(v) for v in zip(*stats, strict=True)))
        zero = interval([rsum(z) for z in g.zero])
        lines["zero-shot"] = (g.sizes, [zero[0]] * len(g.sizes))
        panels[f"{name} regime"] = lines
    return panels


def loss_panels(study: dict) -> dict[str, dict[str, tuple]]:
    """Per regime: each AGREE loss, weighted, per step (mean over seeds) at the middle size."""
    panels = {}
    for name in study["plan"]["regimes"]:
        runs = Regime(study, name).agree(study["middle"])
        lines = {}
        for loss, weight in study["loss_weights"].items():
            curves = [r["train_curves"].get(loss) for r in runs]
            if weight == 0 or not curves or None in curves:
                continue
            steps = min(len(c) for c in curves)
            mean = [weight * statistics.fmean(c[i] for c in curves) for i in range(steps)]
            lines[f"{weight:g} × {loss}"] = (list(range(1, steps + 1)), mean)
        panels[f"{name} regime, AGREE at {study['middle']} images"] = lines
    return panels


def figure_paths(folder: Path, stem: str) -> dict[str, Path]:
    """The page's figures, by alt text: PNG files beside the page, named after it."""
    return {
        "test RSUM against training-set size": folder / f"{stem}-learning-curve.png",
        "AGREE's losses during training": folder / f"{stem}-training-losses.png",
    }


def draw_figures(study: dict, paths: dict[str, Path]) -> None:
    """Write the figures of ``figure_paths``."""
    curve, losses = paths.values()
    line_plot(curve_panels(study), "training images", "test RSUM (95 % CI)", curve, ylim=None, log_x=True)
    line_plot(loss_panels(study), "step", "weighted training loss", losses, ylim=None)
