"""The AGREE effect study on the embedded scenes (docs/study-plan.md); writes docs/results.md.

    python -m agree.study [output_dir=outputs/study] [doc=docs/results.md] [seeds=[0,1,2,3,4]] [key=value ...]

In each regime of the scenes (``binding``, ``neglect``: ``agree.data.synthetic``), per seed s (it
seeds both the generated data and the training), every fine-tuning run making ``steps`` optimiser
steps whatever the training-set size:

- zero-shot: the regime's pretrained tiny model, raw / EGR / TBR / EGR + TBR (k = 20);
- learning rates: CLIP-only and AGREE at each of ``lrs``, at the middle size, on ``lr_seeds``; each
  method's rate is the one with the best mean validation RSUM, per regime;
- ``loss_options.margin_reduction``: AGREE at its rate with ``sum`` and with ``mean`` at the middle
  size; the better on validation, pooled over regimes and seeds, is used by every other AGREE run;
- the learning curve: CLIP-only and AGREE at every size of ``sizes``;
- at the middle size: AGREE with ``method=reference``, CLIP-only and AGREE with swap negatives (when
  the loss ``swap_negatives`` exists), and, in ``ablation_regimes``, AGREE without each loss of ``drop``.

Runs are kept under ``output_dir`` (their data under ``output_dir/data``) and a run's record is
reused only when every parameter that made it equals the request; the study stops in one line,
before any work, when one does not. Every ``key=value`` argument naming none of the study's keys
(``--help`` lists them) goes to every training, and to every evaluation too when the evaluation's
config has that key (e.g. ``data.synthetic.noise=0.1``; ``trainer.*`` and ``optim.*`` reach the
trainings only). The page and its figures are made by ``agree.study_report`` from the records alone.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from agree.atomic import atomic_path, write_json
from agree.cli import run_command
from agree.config import loss_weights_preset
from agree.errors import ConfigError
from agree.evaluate import evaluate
from agree.folders import claim
from agree.model import registry
from agree.study_report import draw_figures, figure_paths, mean_val, results_page
from agree.summary import ZERO_SHOT_RUNS, chance_rsum, zero_shot_stages
from agree.train import train

RECORD_FORMAT = 2  # a record of another format is never reused
LOSSES = registry.PAPER_LOSSES  # ablated one at a time (the paper's six; swap negatives has rows of its own)
SWAPS = "swap_negatives"  # the binding-aware loss; its rows are run when the registry has it
MODELS = {"binding": "scenes_pretrained", "neglect": "scenes_neglect_pretrained"}  # each regime's
# Keys the study sets for each run: a user's key=value for them is refused, naming the study key.
SET_BY_STUDY = {
    "seed": "seeds",
    "data.synthetic.seed": "seeds",
    "data.synthetic.regime": "regimes",
    "data.synthetic.train_images": "sizes",
    "data.synthetic.val_images": "val_images",
    "data.synthetic.test_images": "test_images",
    "model": "regimes (each regime has its model)",
    "losses": "the rows of the plan",
    "optim.lr": "lrs",
    "trainer.max_steps": "steps",
    "trainer.max_epochs": "steps",
    "trainer.check_val_every_n_epoch": "steps",
    "loss_options.margin_reduction": "the study's own choice",
    "method": "the rows of the plan",
    "drop_loss": "drop",
    "output_dir": "output_dir",
    "ckpt_path": "output_dir",
    "data.root": "output_dir",
    "data.vg_root": "output_dir",
    "rerank": "the rows of the plan",
}


@dataclass
class StudyConfig:
    """The AGREE effect study (docs/study-plan.md); any other key=value overrides every run's config."""

    output_dir: str = "outputs/study"  # every run's outputs (new, empty or a previous study's)
    doc: str = "docs/results.md"  # the page to write; its figures go beside it (study-*.png)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    regimes: list[str] = field(default_factory=lambda: list(MODELS))
    sizes: list[int] = field(default_factory=lambda: [32, 96, 288])  # training images; middle: sizes[1]
    steps: int = 45  # optimiser steps of every fine-tuning run (rounded to whole epochs)
    val_images: int = 60
    test_images: int = 100
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3])  # learning rates tried per method
    lr_seeds: list[int] = field(default_factory=lambda: [0])  # those of seeds that choose them
    drop: list[str] = field(default_factory=lambda: list(LOSSES))  # the losses to ablate
    ablation_regimes: list[str] = field(default_factory=lambda: ["neglect"])
    keep_checkpoints: bool = False  # keep each run's last.ckpt (about 90 MB each)
    render_only: bool = False  # rewrite doc from output_dir/study.json, running nothing
    overrides: list[str] = field(default_factory=list)  # for every training (and evaluation)


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the grid: its coordinates (the folder name says them all)."""

    regime: str
    seed: int
    size: int
    losses: str  # clip | agree (the loss presets)
    lr: float
    reduction: str = "sum"  # loss_options.margin_reduction (AGREE)
    method: str = "agree"  # agree | reference
    swaps: bool = False
    drop: str | None = None

    def folder(self) -> str:
        name = self.losses + ("+swaps" if self.swaps else "") + f"_lr{self.lr:g}"
        if self.losses == "agree":
            name += f"_{self.reduction}" + ("_reference" if self.method == "reference" else "")
        name += f"_without_{self.drop}" if self.drop else ""
        return f"{self.regime}/seed{self.seed}/train{self.size}/{name}"


@dataclass
class Grid:
    """What every run of one study shares: its folder, sizes, and the user's overrides, split."""

    out: Path
    cfg: StudyConfig
    shared: list[str]  # the user's overrides for trainings and evaluations (``agree.study.split_overrides``)
    train_only: list[str]
    eval_only: list[str]
    captions_per_image: int
    batch_size: int

    @property
    def lr_seeds(self) -> list[int]:
        """The seeds that choose the learning rates: those of ``lr_seeds`` that the study runs."""
        return [s for s in self.cfg.seeds if s in self.cfg.lr_seeds]

    @property
    def middle(self) -> int:
        """The training-set size of the learning-rate choice, the ablation and the other rows."""
        return sorted(self.cfg.sizes)[len(self.cfg.sizes) // 2]

    def data(self, regime: str, seed: int, size: int) -> list[str]:
        """The overrides that make one dataset and the model, shared by training and evaluation."""
        return [
            f"model={MODELS[regime]}",
            f"seed={seed}",
            f"data.synthetic.seed={seed}",
            f"data.synthetic.regime={regime}",
            f"data.synthetic.train_images={size}",
            f"data.synthetic.val_images={self.cfg.val_images}",
            f"data.synthetic.test_images={self.cfg.test_images}",
            *self.shared,
        ]

    def data_paths(self, regime: str, seed: int, size: int) -> list[str]:
        root = self.out / "data" / f"{regime}-seed{seed}-train{size}"
        return [f"data.root={root}", f"data.vg_root={root / 'VG'}"]

    def epochs(self, size: int) -> int:
        """Whole epochs of about ``steps`` optimiser steps (full batches only)."""
        batches = max(1, size * self.captions_per_image // self.batch_size)
        return max(1, round(self.cfg.steps / batches))

    def training(self, run: Run) -> list[str]:
        """The training overrides of ``run`` that decide its result (paths aside)."""
        epochs = self.epochs(run.size)
        extra = [f"loss_options.margin_reduction={run.reduction}"] if run.method == "agree" else []
        if run.method == "reference":  # the study's schedule, not the release's 50-epoch cosine
            extra += ["method=reference", "optim.schedule_epochs=null"]
        if run.swaps:
            extra.append(f"losses.{SWAPS}={loss_weights_preset(run.losses)['clip']:g}")
        return [
            "+experiment=scenes_finetune",
            *self.data(run.regime, run.seed, run.size),
            f"losses={run.losses}",
            f"optim.lr={run.lr}",
            f"trainer.max_epochs={epochs}",
            f"+trainer.check_val_every_n_epoch={epochs}",  # validation once, at the end
            f"drop_loss={run.drop or 'null'}",
            *extra,
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
            *self.train_only,
        ]

    def params(self, run: Run) -> dict:
        """Everything that made ``run``'s record: compared with a saved record before reusing it."""
        test = [*self.data(run.regime, run.seed, run.size), "rerank=tbr", *self.eval_only]
        return {"format": RECORD_FORMAT, "run": asdict(run), "train": self.training(run), "evaluate": test}

    def zero_params(self, regime: str, seed: int) -> dict:
        data = [*self.data(regime, seed, self.middle), *self.eval_only]
        return {"format": RECORD_FORMAT, "zero_shot": [regime, seed], "evaluate": data}


def logged_losses(metrics_csv: Path) -> dict[str, list[float]]:
    """Each ``train/loss_<name>`` of a CSV log, per logged step."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        column.removeprefix("train/loss_"): [float(r[column]) for r in rows if r[column]]
        for column in (rows[0] if rows else [])
        if column.startswith("train/loss_")
    }


def _record_path(grid: Grid, folder: str) -> Path:
    return grid.out / folder / "record.json"


_HOW = "choose another output_dir, or delete that run's folder to run it again"


def _reused(path: Path, params: dict) -> dict | None:
    """The record at ``path`` when it was made with ``params``; None when there is none.

    A record made otherwise stops the study (``check_records`` names it before any work).
    """
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("params") != params:
        raise ConfigError(f"{path}: made with other parameters than this study's; {_HOW}")
    return record


def first_difference(saved: dict, wanted: dict) -> str:
    """The first parameter where a saved record's ``params`` differ from the request's."""
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            extra = [x for x in a if x not in b] or ["(none)"]
            missing = [x for x in b if x not in a] or ["(none)"]
            return f"{key}: the record has {extra[0]}, this study {missing[0]}"
        return f"{key}: the record has {a!r}, this study {b!r}"
    return "none"


def check_records(grid: Grid) -> None:
    """Every record under the study's folder matches this request's parameters, before any work.

    A record's coordinates are in its params; its parameters under this request are recomputed from
    them, so a change of sizes, steps, data, model or any override stops the study in one line.
    """
    for path in sorted(grid.out.glob("*/seed*/**/record.json")):
        try:
            saved = json.loads(path.read_text()).get("params") or {}
            if "zero_shot" in saved:
                wanted = grid.zero_params(*saved["zero_shot"])
            else:
                wanted = grid.params(Run(**saved["run"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ConfigError(
                f"{path}: not a record of this version of agree.study (format {RECORD_FORMAT}); {_HOW}"
            ) from None
        if saved != wanted:
            raise ConfigError(
                f"{path}: made with other parameters ({first_difference(saved, wanted)}); {_HOW}"
            )


def zero_shot(grid: Grid, regime: str, seed: int) -> dict:
    """Zero-shot record: ``{"regime", "seed", "test": {raw, egr, tbr, egr_tbr}, "probe"}``."""
    params = grid.zero_params(regime, seed)
    path = _record_path(grid, f"{regime}/seed{seed}/zero_shot")
    record = _reused(path, params)
    if record is None:
        data = [*params["evaluate"], *grid.data_paths(regime, seed, grid.middle)]
        res = {
            name: evaluate(compose("evaluate", [f"output_dir={path.parent / name}", *extra, *data]))
            for name, extra in ZERO_SHOT_RUNS.items()
        }
        record = {
            "params": params,
            "regime": regime,
            "seed": seed,
            "test": zero_shot_stages(res),
            "probe": res["tbr"].get("probe"),
        }
        write_json(path, record)
    return record


def fine_tune(grid: Grid, run: Run) -> dict:
    """Record of one fine-tuning run: its coordinates, validation RSUM, test results (raw, tbr),
    the binding probe, and each loss per logged step."""
    params = grid.params(run)
    out = _record_path(grid, run.folder()).parent
    record = _reused(out / "record.json", params)
    if record is not None:
        return record
    shutil.rmtree(out / "train", ignore_errors=True)  # an interrupted run's last.ckpt would be reused
    paths = grid.data_paths(run.regime, run.seed, run.size)
    start, cpu = time.perf_counter(), time.process_time()
    metrics, _ = train(compose("train", [*params["train"], *paths, f"output_dir={out / 'train'}"]))
    seconds = time.perf_counter() - start
    if "val/rsum" not in metrics:
        raise ConfigError(f"{out}: the run ended without a validation; check trainer.* overrides")
    ckpt = out / "train" / "checkpoints" / "last.ckpt"
    test = evaluate(
        compose("evaluate", [*params["evaluate"], *paths, f"output_dir={out / 'test'}", f"ckpt_path={ckpt}"])
    )
    curves = logged_losses(out / "train" / "csv" / "metrics.csv")
    record = {
        "params": params,
        **asdict(run),
        "val_rsum": metrics["val/rsum"],
        "test": {stage: test[stage] for stage in ("raw", "tbr")},
        "probe": test.get("probe"),
        "steps": len(next(iter(curves.values()), [])),
        "train_seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,  # training and test, every thread: a load-free cost
        "train_curves": curves,
    }
    write_json(out / "record.json", record)
    if not grid.cfg.keep_checkpoints:
        shutil.rmtree(ckpt.parent)
    return record


def choose_lr(records: list[dict]) -> float:
    """The learning rate with the best mean validation RSUM over its records."""
    by_lr: dict[float, list[dict]] = {}
    for r in records:
        by_lr.setdefault(r["lr"], []).append(r)
    return max(by_lr, key=lambda lr: mean_val(by_lr[lr]))


def choose_reduction(sums: list[dict], means: list[dict], tie: float = 0.5) -> str:
    """``mean`` when its mean validation RSUM beats ``sum``'s by more than ``tie``; else ``sum``."""
    return "mean" if mean_val(means) > mean_val(sums) + tie else "sum"


def run_study(grid: Grid) -> dict:
    """Every run of the grid, in the plan's order (cached under ``grid.out``); returns all records."""
    cfg, middle = grid.cfg, grid.middle
    runs: dict[str, dict] = {}

    def each(seeds: list[int], **coords) -> list[dict]:
        made = [Run(seed=s, **coords) for s in seeds]
        runs.update((run.folder(), fine_tune(grid, run)) for run in made)
        return [runs[run.folder()] for run in made]

    zero = [zero_shot(grid, regime, s) for regime in cfg.regimes for s in cfg.seeds]
    lr: dict[str, dict[str, float]] = {}
    by_reduction: dict[str, list[dict]] = {"sum": [], "mean": []}
    for regime in cfg.regimes:
        tried = {
            losses: [
                r
                for rate in cfg.lrs
                for r in each(grid.lr_seeds, regime=regime, size=middle, losses=losses, lr=rate)
            ]
            for losses in ("clip", "agree")
        }
        lr[regime] = {losses: choose_lr(records) for losses, records in tried.items()}
        for reduction, records in by_reduction.items():
            records += each(
                cfg.seeds,
                regime=regime,
                size=middle,
                losses="agree",
                lr=lr[regime]["agree"],
                reduction=reduction,
            )
    reduction = choose_reduction(by_reduction["sum"], by_reduction["mean"])
    for regime in cfg.regimes:
        clip = {"regime": regime, "losses": "clip", "lr": lr[regime]["clip"]}
        agree = {"regime": regime, "losses": "agree", "lr": lr[regime]["agree"], "reduction": reduction}
        for size in cfg.sizes:
            each(cfg.seeds, size=size, **clip)
            each(cfg.seeds, size=size, **agree)
        each(cfg.seeds, size=middle, **{**agree, "reduction": "sum", "method": "reference"})
        if SWAPS in registry.LOSSES:
            each(cfg.seeds, size=middle, swaps=True, **clip)
            each(cfg.seeds, size=middle, swaps=True, **agree)
        if regime in cfg.ablation_regimes:
            for drop in cfg.drop:
                each(cfg.seeds, size=middle, drop=drop, **agree)
    return {
        "zero_shot": zero,
        "runs": list(runs.values()),
        "chosen": {"lr": lr, "reduction": reduction},
        "loss_weights": loss_weights_preset("agree"),
        "chance_rsum": chance_rsum(cfg.test_images, grid.captions_per_image),
        "plan": {
            key: getattr(cfg, key)
            for key in ("seeds", "regimes", "sizes", "steps", "val_images", "test_images", "lrs")
        }
        | {"lr_seeds": grid.lr_seeds},
        "middle": middle,
        "epochs": {str(size): grid.epochs(size) for size in cfg.sizes},
    }


def split_overrides(
    overrides: list[str], training: DictConfig, evaluation: DictConfig
) -> tuple[list[str], list[str], list[str]]:
    """The overrides for (trainings and evaluations, trainings only, evaluations only), by the configs
    that have their key: ``data.*``, ``model.*`` both, ``trainer.*``, ``optim.*`` the trainings,
    ``rerank.*`` the evaluations; a key neither has goes to the trainings (whose Hydra names it)."""
    absent = object()
    split: tuple[list[str], list[str], list[str]] = ([], [], [])
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        in_train, in_eval = (
            OmegaConf.select(c, key, default=absent) is not absent for c in (training, evaluation)
        )
        split[0 if in_train and in_eval else 2 if in_eval else 1].append(override)
    return split


def check_overrides(overrides: list[str]) -> None:
    """A user's key=value never sets what the study sets per run."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in SET_BY_STUDY:
            raise ConfigError(f"{key}: set by the study for each run; use {SET_BY_STUDY[key]} instead")


def make_grid(out: Path, cfg: StudyConfig) -> Grid:
    """The grid of ``cfg`` with its overrides checked by Hydra (inside ``initialize_config_module``)."""
    experiment = ["+experiment=scenes_finetune"]
    shared, train_only, eval_only = split_overrides(
        cfg.overrides, compose("train", experiment), compose("evaluate", [])
    )
    compose("evaluate", [*shared, *eval_only])  # a bad override stops here, before any write
    training = compose("train", [*experiment, *shared, *train_only])
    return Grid(
        out,
        cfg,
        shared,
        train_only,
        eval_only,
        training.data.synthetic.captions_per_image,
        training.data.batch_size,
    )


def machine() -> str:
    """A one-line description of this machine, with its load (other jobs share it)."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, 15-min load average {os.getloadavg()[2]:.1f} at the end, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def write_page(doc: Path, records: dict, meta: dict) -> None:
    """Write the page and its figures beside it, each atomically; nothing when the records are partial."""
    figures = figure_paths(doc.parent, doc.stem)
    page = results_page(records, meta, {alt: path.name for alt, path in figures.items()})
    draw_figures(records, figures)
    with atomic_path(doc) as tmp:
        tmp.write_text(page)
    print(f"wrote {doc} and {', '.join(str(p) for p in figures.values())}")


def saved_study(path: Path) -> dict:
    """The records of ``study.json``; one line when it is missing or damaged."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run the study first (without render_only=true)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read it ({e}); run the study again to rewrite it") from None
    if not isinstance(saved, dict) or saved.get("format") != RECORD_FORMAT:
        raise ConfigError(
            f"{path}: not a record of this agree.study (format {RECORD_FORMAT}); run the study again"
        )
    return saved


def render_saved(doc: Path, source: Path) -> None:
    """Write the page of ``source`` (``study.json``); a missing, damaged or partial file is one line."""
    saved = saved_study(source)
    try:
        write_page(doc, saved, saved["meta"])
    except (KeyError, TypeError, ValueError, IndexError, statistics.StatisticsError) as e:
        raise ConfigError(
            f"{source}: incomplete or damaged ({type(e).__name__}: {e}); run the study again to rewrite it"
        ) from None


def study(cfg: StudyConfig, command: str) -> None:
    """Run (or, with ``render_only``, only render) the study and write its page; ``command`` is recorded."""
    out, doc = Path(cfg.output_dir), Path(cfg.doc)
    unknown = [name for name in cfg.drop if name not in LOSSES]
    if unknown:
        raise ConfigError(f"drop: {unknown[0]!r} is not a loss; choose among {', '.join(LOSSES)}")
    bad_regime = [r for r in cfg.regimes + cfg.ablation_regimes if r not in MODELS]
    if bad_regime:
        raise ConfigError(f"regimes: {bad_regime[0]!r} is not a regime; choose among {', '.join(MODELS)}")
    if not cfg.sizes or not cfg.seeds or not cfg.lrs:
        raise ConfigError("sizes, seeds, lrs: give at least one value each")
    if not set(cfg.lr_seeds) & set(cfg.seeds):
        raise ConfigError(f"lr_seeds={cfg.lr_seeds}: none of them is among seeds={cfg.seeds}")
    check_overrides(cfg.overrides)
    if cfg.render_only:
        render_saved(doc, out / "study.json")
        return
    start = time.perf_counter()
    with initialize_config_module("agree.conf", version_base="1.3"):
        grid = make_grid(out.resolve(), cfg)
        claim(grid.out, "study")  # a user's folder is refused: its run folders are cleared on a rerun
        check_records(grid)
        records = run_study(grid)
    meta = {"command": command, "machine": machine(), "wall_seconds": time.perf_counter() - start}
    saved = {"format": RECORD_FORMAT, **records, "meta": meta}
    write_json(out / "study.json", saved)
    write_page(doc, saved, meta)
    print(f"study finished in {meta['wall_seconds'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    """``python -m agree.study key=value ...`` (default ``sys.argv[1:]``); ``--help`` lists the keys."""
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m agree.study", *argv])
    run_command("python -m agree.study", StudyConfig, lambda cfg: study(cfg, command), argv)


if __name__ == "__main__":
    main()
