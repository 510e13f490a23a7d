"""The demo: evaluate the random-init tiny model, fine-tune it on the embedded scenes, evaluate again.

    python -m agree.demo [OUT_DIR] [key=value ...]     (what `make demo` runs)

The second evaluation re-ranks (EGR, then TBR); the demo ends by writing its HTML report
(``OUT_DIR/after/report.html``, see ``agree.report``) and printing the path.

Extra ``key=value`` overrides apply to the training; those of ``model``, ``data`` and ``seed``
also to both evaluations.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from agree.evaluate import evaluate, format_table
from agree.folders import claim
from agree.report import write_report
from agree.train import train


def run(out_dir: Path, overrides: list[str]) -> dict:
    """Run the three steps under ``out_dir``; return ``{"before": results, "after": results}``.

    ``out_dir`` must be new, empty or a previous demo's (marked, see ``agree.folders``); that
    demo's training folder is removed first, so the new training starts afresh.
    """
    claim(out_dir, "demo")
    shutil.rmtree(out_dir / "train", ignore_errors=True)
    with initialize_config_module("agree.conf", version_base="1.3"):
        train_cfg = compose("train", ["+experiment=demo", f"output_dir={out_dir / 'train'}", *overrides])
        shared = [o for o in overrides if o.split(".")[0].split("=")[0] in ("model", "data", "seed")]
        before = evaluate(compose("evaluate", [f"output_dir={out_dir / 'before'}", *shared]))
        train(train_cfg)
        fine_tuned = [f"ckpt_path={out_dir / 'train' / 'checkpoints' / 'last.ckpt'}", "rerank=egr_tbr"]
        after = evaluate(compose("evaluate", [f"output_dir={out_dir / 'after'}", *fine_tuned, *shared]))
    return {"before": before, "after": after}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0] if args and "=" not in args[0] else "outputs/demo").resolve()
    overrides = [a for a in args if "=" in a]
    start = time.perf_counter()
    results = run(out_dir, overrides)
    table = {"random init": results["before"]["raw"], "fine-tuned": results["after"]["raw"]}
    print(format_table(table))
    report = write_report(out_dir / "after")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs in {out_dir}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
