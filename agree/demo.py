"""The demo: the paper's pipeline on the embedded scenes, a few minutes on 2 CPU cores.

    python -m agree.demo [output_dir=outputs/demo] [key=value ...]     (agree-demo; what `make demo` runs)

1. zero-shot: the pretrained tiny model (``model=scenes_pretrained``) on the test split, raw
   search, EGR, TBR and EGR + TBR (k = 20);
2. AGREE fine-tuning (all six losses) on the train split;
3. the fine-tuned model on the test split, raw search and TBR (k = 10);
4. the report of the fine-tuned evaluation (``OUT_DIR/fine_tuned/report.html``).

Prints one table in the paper's layout, with the binding probe's swap accuracy, and writes it as
``OUT_DIR/summary.json`` (see ``agree.summary``), ``OUT_DIR`` being ``output_dir``. Every other
``key=value`` argument is an override of ``agree.train``'s config
(``data.synthetic.train_images=100``, ``trainer.max_epochs=2``; see ``agree.cli``); those of
``model``, ``data`` and ``seed`` also apply to the evaluations. An override Hydra cannot apply
stops the demo before it writes anything.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_module

from agree.atomic import write_json
from agree.cli import run_command
from agree.config import merge_overrides
from agree.console import quiet_lightning
from agree.data.evaluation_files import PROBE
from agree.evaluate import CONTENTS as EVALUATION_CONTENTS
from agree.evaluate import evaluate
from agree.folders import claim
from agree.report import write_report
from agree.report.write import REPORT_FILES
from agree.summary import (
    ZERO_SHOT_RUNS,
    chance_rsum,
    demo_problems,
    format_summary,
    summary_row,
    zero_shot_stages,
)
from agree.train import CONTENTS as TRAINING_CONTENTS
from agree.train import train

# The demo's setting, for every step (a user's key=value wins): the regime the paper targets (the
# model pretrained on alt-text naming only the salient object; captions name every object) and the
# learning rate the study chose there (docs/results.md)
SCENES = [
    "data.synthetic.regime=neglect",
    "model=scenes_neglect_pretrained",
    "data.synthetic.train_images=200",
    "optim.lr=1e-3",
]
EVAL_KEYS = ("model", "data", "seed")  # override keys that also apply to the evaluations
CONTENTS = (  # what the demo writes into its folder: make clean deletes it when it holds nothing else
    "summary.json",
    *(f"train/{pattern}" for pattern in TRAINING_CONTENTS),
    *(f"{step}/{p}" for step in ("zero_shot/*", "fine_tuned") for p in (*EVALUATION_CONTENTS, *REPORT_FILES)),
)


@dataclass
class DemoConfig:
    """The paper's pipeline on the embedded scenes; any other key=value overrides agree.train's config."""

    output_dir: str = "outputs/demo"  # new, empty or a previous demo's
    overrides: list[str] = field(default_factory=list)  # agree.train overrides (model, data, seed: all steps)


def run(out_dir: Path, overrides: list[str]) -> tuple[list[dict], float]:
    """Run the pipeline under ``out_dir``; return the summary rows and the RSUM of chance.

    ``out_dir`` must be new, empty or a previous demo's (marked, see ``agree.folders``); that
    demo's training folder is removed first, so the new training starts afresh. Every config is
    composed (its overrides checked) before anything is written.
    """
    overrides = merge_overrides(SCENES, overrides)
    shared = [o for o in overrides if o.split(".")[0].split("=")[0] in EVAL_KEYS]
    ckpt = out_dir / "train" / "checkpoints" / "last.ckpt"
    with initialize_config_module("agree.conf", version_base="1.3"):
        zero_cfgs = {
            name: compose("evaluate", [f"output_dir={out_dir / 'zero_shot' / name}", *extra, *shared])
            for name, extra in ZERO_SHOT_RUNS.items()
        }
        train_cfg = compose(
            "train", ["+experiment=scenes_finetune", f"output_dir={out_dir / 'train'}", *overrides]
        )
        tuned_cfg = compose(
            "evaluate", [f"output_dir={out_dir / 'fine_tuned'}", f"ckpt_path={ckpt}", "rerank=tbr", *shared]
        )
        claim(out_dir, "demo", contents=CONTENTS)
        shutil.rmtree(out_dir / "train", ignore_errors=True)
        print(f"1/3 zero-shot: raw, egr, tbr, egr_tbr ({out_dir / 'zero_shot'})", flush=True)
        zero = {name: evaluate(cfg) for name, cfg in zero_cfgs.items()}
        scenes = zero_cfgs["tbr"].data.synthetic
        chance = chance_rsum(scenes.test_images, scenes.captions_per_image)
        print(f"2/3 fine-tuning with the AGREE losses ({out_dir / 'train'})", flush=True)
        train(train_cfg)
        print(f"3/3 fine-tuned: raw, tbr ({out_dir / 'fine_tuned'})", flush=True)
        tuned = evaluate(tuned_cfg)
    probe = zero["tbr"].get(PROBE)  # every zero-shot run evaluates the same model
    rows = [
        summary_row("zero-shot", "none", stage, block, probe)
        for stage, block in zero_shot_stages(zero).items()
    ]
    return rows + [
        summary_row("fine-tuned", "agree", stage, tuned[stage], tuned.get(PROBE)) for stage in ("raw", "tbr")
    ], chance


def run_demo(cfg: DemoConfig) -> None:
    """Run the demo, print its table and write ``summary.json`` and the report; exit 1 if it failed."""
    out_dir = Path(cfg.output_dir).resolve()
    quiet_lightning()
    start = time.perf_counter()
    rows, chance = run(out_dir, cfg.overrides)
    write_json(out_dir / "summary.json", rows)
    print(format_summary(rows))
    report = write_report(out_dir / "fine_tuned")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs in {out_dir}")
    print(f"summary: {out_dir / 'summary.json'}\nreport: {report}")
    problems = demo_problems(rows, chance)
    if problems:
        raise SystemExit("the demo did not show what it should: " + "; ".join(problems))
    print(
        f"zero-shot RSUM is {rows[0]['rsum'] / chance:.0f} x chance ({chance:.1f}); fine-tuning improved it"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m agree.demo key=value ...`` (default ``sys.argv[1:]``); ``--help`` lists the keys."""
    run_command("python -m agree.demo", DemoConfig, run_demo, argv)


if __name__ == "__main__":
    main()
