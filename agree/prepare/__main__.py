"""``agree-prepare <step> key=value ...`` (``python -m agree.prepare``): run one data-preparation step.

Each step module has a ``Config`` dataclass (its keys and defaults) and ``run(config)``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from agree import cli
from agree.errors import ConfigError, DataFormatError

USAGE = "python -m agree.prepare <step> key=value ..."
STEPS = {
    "karpathy": "agree.prepare.karpathy",
    "entities": "agree.prepare.entities",
    "ground": "agree.prepare.ground",
    "visual-genome": "agree.prepare.visual_genome",
}


def parse(argv: list[str]) -> tuple[ModuleType, object]:
    """(step module, its validated config object) from ``<step> key=value ...``."""
    if not argv or argv[0] not in STEPS:
        given = f"unknown step {argv[0]!r}; " if argv else ""
        steps = ", ".join(STEPS)
        raise ConfigError(f"{given}usage: {USAGE}; steps: {steps} (--help: their keys)")
    module = importlib.import_module(STEPS[argv[0]])
    return module, cli.parse(argv[0], module.Config, argv[1:])


def usage() -> str:
    """Every step with its keys (``--help``)."""
    lines = [USAGE]
    for step, name in STEPS.items():
        lines.append(f"  {step}: {' '.join(cli.describe(importlib.import_module(name).Config))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one step; a user error is one line on stderr and exit code 1, as every command's."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    try:
        module, cfg = parse(argv)
        module.run(cfg)
    except (ConfigError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
