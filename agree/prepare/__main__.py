"""``python -m agree.prepare <step> key=value ...``: run one data-preparation step.

Each step module has a ``Config`` dataclass (its keys and defaults) and ``run(config)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from types import ModuleType

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agree.data.formats import DataFormatError
from agree.prepare import ConfigError

USAGE = "python -m agree.prepare <step> key=value ..."
STEPS = {
    "karpathy": "agree.prepare.karpathy",
    "entities": "agree.prepare.entities",
    "ground": "agree.prepare.ground",
    "visual-genome": "agree.prepare.visual_genome",
}


def _value(default: object) -> str:
    if default is MISSING:
        return "???"
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


def describe(config: type) -> str:
    """``key=default`` of every key of a step config (``key=???`` when required)."""
    fields = sorted(dataclasses.fields(config), key=lambda f: f.default is not MISSING)  # required first
    return " ".join(f"{f.name}={_value(f.default)}" for f in fields)


def parse(argv: list[str]) -> tuple[ModuleType, object]:
    """(step module, its validated config object) from ``<step> key=value ...``."""
    if not argv or argv[0] not in STEPS:
        given = f"unknown step {argv[0]!r}; " if argv else ""
        steps = ", ".join(STEPS)
        raise ConfigError(f"{given}usage: {USAGE}; steps: {steps} (--help: their keys)")
    module = importlib.import_module(STEPS[argv[0]])
    valid = [f.name for f in dataclasses.fields(module.Config)]
    pairs = argv[1:]
    for pair in pairs:
        key = pair.split("=", 1)[0]
        if "=" not in pair or key not in valid:
            problem = f"{pair!r} is not key=value" if "=" not in pair else f"unknown key {key!r}"
            raise ConfigError(f"{argv[0]}: {problem}; keys: {describe(module.Config)}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(module.Config), OmegaConf.from_dotlist(pairs))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{argv[0]}: {getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = describe(module.Config)
        raise ConfigError(f"{argv[0]}: missing required {', '.join(missing)}; keys: {keys}")
    return module, OmegaConf.to_object(cfg)


def usage() -> str:
    """Every step with its keys (``--help``)."""
    lines = [USAGE]
    for step, name in STEPS.items():
        lines.append(f"  {step}: {describe(importlib.import_module(name).Config)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    try:
        module, cfg = parse(argv)
        module.run(cfg)
    except (ConfigError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
