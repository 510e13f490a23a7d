"""The paper's experiment on the embedded scenes, over seeds; writes docs/results.md.

    python -m agree.study [output_dir=outputs/study] [doc=docs/results.md] ['seeds=[0,1,2]'] [key=value ...]

Per seed s (the scenes data and the training are both seeded with s):
- zero-shot: the pretrained tiny model (``model=scenes_pretrained``), raw / EGR / TBR / EGR + TBR
  (k = 20) on the test split;
- fine-tuning (``+experiment=scenes_finetune``) with the CLIP loss only and with all six AGREE
  losses, at every learning rate of ``lrs``; each method's rate is the one with the best mean
  validation RSUM over the seeds, and its runs are reported on the test split, raw and TBR (k = 10);
- the ablation: AGREE without each loss, at AGREE's chosen rate.

Every run keeps its outputs under ``output_dir`` and is skipped when run again (its
``record.json`` exists), so an interrupted study resumes. Every ``key=value`` argument naming none
of the study's keys (``--help`` lists them) is an override for every training and evaluation
(e.g. ``data.synthetic.train_images=300``; see ``agree.cli``). The page is made by
``agree.study_report`` from the records alone.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from agree.atomic import atomic_path, write_json
from agree.cli import run_command
from agree.config import loss_weights_preset, merge_overrides
from agree.errors import ConfigError
from agree.evaluate import evaluate
from agree.folders import claim
from agree.model import registry
from agree.study_report import results_page
from agree.summary import ZERO_SHOT_RUNS, chance_rsum, zero_shot_stages
from agree.train import train

LOSSES = tuple(registry.LOSSES)  # ablated one at a time
SCENES = [  # the study's data size (every split), for every run; key=value arguments replace these
    "data.synthetic.train_images=200",
    "data.synthetic.val_images=60",
    "data.synthetic.test_images=100",
]


@dataclass
class StudyConfig:
    """The seeded study on the embedded scenes; any other key=value overrides every run's config."""

    output_dir: str = "outputs/study"  # every run's outputs (new, empty or a previous study's)
    doc: str = "docs/results.md"  # the page to write
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4])  # learning rates tried per method
    drop: list[str] = field(default_factory=lambda: list(LOSSES))  # the losses to ablate
    render_only: bool = False  # rewrite doc from output_dir/study.json, running nothing
    overrides: list[str] = field(default_factory=list)  # for every training and evaluation


def logged_losses(metrics_csv: Path) -> dict[str, dict[str, float]]:
    """Each ``train/loss_<name>`` of a CSV log: its first logged value and its mean over the last 5."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for column in rows[0] if rows else []:
        if column.startswith("train/loss_"):
            values = [float(r[column]) for r in rows if r[column]]
            out[column.removeprefix("train/loss_")] = {
                "first": values[0],
                "last": statistics.fmean(values[-5:]),
            }
    return out


def _cached(path: Path, make) -> dict:
    """The record at ``path``, computed and written by ``make()`` when absent."""
    if path.is_file():
        return json.loads(path.read_text())
    record = make()
    write_json(path, record)
    return record


def zero_shot(out: Path, seed: int, overrides: list[str]) -> dict:
    """Zero-shot record of one seed: ``{"seed", "test": {raw, egr, tbr, egr_tbr}}``."""

    def make() -> dict:
        shared = ["model=scenes_pretrained", f"seed={seed}", f"data.synthetic.seed={seed}", *overrides]
        res = {
            name: evaluate(compose("evaluate", [f"output_dir={out / name}", *extra, *shared]))
            for name, extra in ZERO_SHOT_RUNS.items()
        }
        return {"seed": seed, "test": zero_shot_stages(res)}

    return _cached(out / "record.json", make)


def fine_tune(out: Path, seed: int, losses: str, lr: float, drop: str | None, overrides: list[str]) -> dict:
    """Record of one fine-tuning run: its settings, validation RSUM, test results (raw, tbr)."""

    def make() -> dict:
        shutil.rmtree(out / "train", ignore_errors=True)  # an interrupted run's last.ckpt would be reused
        data = [f"seed={seed}", f"data.synthetic.seed={seed}", *overrides]
        start = time.perf_counter()
        metrics, _ = train(
            compose(
                "train",
                [
                    "+experiment=scenes_finetune",
                    f"losses={losses}",
                    f"optim.lr={lr}",
                    f"drop_loss={drop}" if drop else "drop_loss=null",
                    f"output_dir={out / 'train'}",
                    "logger=csv",
                    "trainer.enable_progress_bar=false",
                    "trainer.log_every_n_steps=1",
                    *data,
                ],
            )
        )
        ckpt = out / "train" / "checkpoints" / "last.ckpt"
        test = evaluate(
            compose("evaluate", [f"output_dir={out / 'test'}", f"ckpt_path={ckpt}", "rerank=tbr", *data])
        )
        return {
            "seed": seed,
            "losses": losses,
            "lr": lr,
            "drop": drop,
            "val_rsum": metrics["val/rsum"],
            "test": {stage: test[stage] for stage in ("raw", "tbr")},
            "train_seconds": time.perf_counter() - start,
            "train_losses": logged_losses(out / "train" / "csv" / "metrics.csv"),
        }

    return _cached(out / "record.json", make)


def choose_lr(records: list[dict], losses: str) -> float:
    """The learning rate with the best mean validation RSUM over seeds (full loss set, no ablation)."""
    by_lr: dict[float, list[float]] = {}
    for r in records:
        if r["losses"] == losses and r["drop"] is None:
            by_lr.setdefault(r["lr"], []).append(r["val_rsum"])
    return max(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))


def run_study(out: Path, seeds: list[int], lrs: list[float], drops: list[str], overrides: list[str]) -> dict:
    """Every run of the study (cached under ``out``); returns all records.

    ``out`` is claimed (see ``agree.folders``) once Hydra has accepted the overrides.
    """
    with initialize_config_module("agree.conf", version_base="1.3"):
        scenes = compose("evaluate", overrides).data.synthetic
        compose("train", ["+experiment=scenes_finetune", *overrides])  # a bad override: before any write
        claim(out, "study")  # a user's folder is refused: its run folders are cleared on a rerun
        zero = [zero_shot(out / f"seed{s}" / "zero_shot", s, overrides) for s in seeds]
        tuned = [
            fine_tune(out / f"seed{s}" / f"{losses}_lr{lr:g}", s, losses, lr, None, overrides)
            for losses in ("clip", "agree")
            for lr in lrs
            for s in seeds
        ]
        agree_lr = choose_lr(tuned, "agree")
        ablation = [
            fine_tune(
                out / f"seed{s}" / f"agree_lr{agree_lr:g}_without_{drop}",
                s,
                "agree",
                agree_lr,
                drop,
                overrides,
            )
            for drop in drops
            for s in seeds
        ]
    return {
        "zero_shot": zero,
        "fine_tuned": tuned,
        "ablation": ablation,
        "chosen_lr": {"clip": choose_lr(tuned, "clip"), "agree": agree_lr},
        "loss_weights": loss_weights_preset("agree"),
        "chance_rsum": chance_rsum(scenes.test_images, scenes.captions_per_image),
        "scenes": OmegaConf.to_container(scenes, resolve=True),
    }


def machine() -> str:
    """A one-line description of this machine, with its load (other jobs share it)."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, 15-min load average {os.getloadavg()[2]:.1f} at the end, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def write_page(doc: Path, records: dict, meta: dict) -> None:
    """Write the results page atomically."""
    with atomic_path(doc) as tmp:
        tmp.write_text(results_page(records, meta))
    print(f"wrote {doc}")


def study(cfg: StudyConfig, command: str) -> None:
    """Run (or, with ``render_only``, only render) the study and write its page; ``command`` is recorded."""
    out, doc = Path(cfg.output_dir), Path(cfg.doc)
    unknown = [name for name in cfg.drop if name not in LOSSES]
    if unknown:
        raise ConfigError(f"drop: {unknown[0]!r} is not a loss; choose among {', '.join(LOSSES)}")
    if cfg.render_only:
        saved = json.loads((out / "study.json").read_text())
        write_page(doc, saved, saved.pop("meta"))
        return
    start = time.perf_counter()
    records = run_study(out.resolve(), cfg.seeds, cfg.lrs, cfg.drop, merge_overrides(SCENES, cfg.overrides))
    meta = {"command": command, "machine": machine(), "wall_seconds": time.perf_counter() - start}
    write_json(out / "study.json", {**records, "meta": meta})
    write_page(doc, records, meta)
    print(f"study finished in {meta['wall_seconds'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    """``python -m agree.study key=value ...`` (default ``sys.argv[1:]``); ``--help`` lists the keys."""
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m agree.study", *argv])
    run_command("python -m agree.study", StudyConfig, lambda cfg: study(cfg, command), argv)


if __name__ == "__main__":
    main()
