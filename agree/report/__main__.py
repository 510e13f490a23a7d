"""``python -m agree.report directory=DIR [queries=6] [seed=0]``: write ``DIR/report.html``."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from agree.cli import run_command
from agree.errors import one_line
from agree.report.load import ReportError
from agree.report.write import write_report


@dataclass
class ReportConfig:
    """Write a self-contained HTML report of an agree.evaluate output or an agree.train run."""

    directory: str = MISSING  # an agree.evaluate output (results.json) or an agree.train run (metrics.json)
    queries: int = 6  # sampled queries per direction
    seed: int = 0  # seed of the query sample


def run(cfg: ReportConfig) -> None:
    """Write the report and print its path; a file it cannot read is one line naming it."""
    try:
        path = write_report(cfg.directory, cfg.queries, cfg.seed)
    except (ValueError, OSError) as e:  # malformed JSON, an unreadable file: no traceback either
        raise ReportError(one_line(e)) from None
    print(path)


def main(argv: list[str] | None = None) -> None:
    run_command("python -m agree.report", ReportConfig, run, argv)


if __name__ == "__main__":
    main()
