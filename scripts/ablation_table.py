"""Gather the metrics.json of an ablation multirun into a markdown table.

python scripts/ablation_table.py multirun/ablation/<date>/<time> [> docs/ablation.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

COLUMNS = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum"]


def rows(sweep_dir: Path) -> list[tuple[str, dict]]:
    """(run label, final val metrics) per finished job, the full model first."""
    found = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        config = yaml.safe_load((metrics_file.parent / ".hydra" / "config.yaml").read_text())
        dropped = config.get("drop_loss")
        label = "full AGREE" if dropped in (None, "none") else f"w/o {dropped}"
        found.append((label, json.loads(metrics_file.read_text())))
    if not found:
        raise SystemExit(f"{sweep_dir}: no */metrics.json (is this a finished multirun folder?)")
    return sorted(found, key=lambda r: r[0] != "full AGREE")


def table(found: list[tuple[str, dict]]) -> str:
    head = "| run | " + " | ".join(c.replace("_", " ").upper() for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for label, metrics in found:
        lines.append(f"| {label} | " + " | ".join(f"{metrics[f'val/{c}']:.1f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    print(table(rows(parser.parse_args().sweep_dir)))


if __name__ == "__main__":
    main()
