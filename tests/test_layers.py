"""Dependencies point one way: entry points -> orchestration -> model / data / retrieval -> I/O.

Each check imports in a fresh interpreter, so that what an earlier test imported does not count.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("agree.train", "agree.evaluate", "agree.report", "agree.prepare", "agree.demo", "agree.study")
DOMAIN = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts)
    for package in ("data", "model", "retrieval")
    for path in (REPO / "agree" / package).glob("*.py")
    if path.name != "__init__.py"
)


def imported_after(*modules: str) -> set[str]:
    """The ``agree`` modules a fresh interpreter holds after importing ``modules``."""
    code = f"import json, sys, {', '.join(modules)}\n" + (
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('agree'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def within(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def test_training_imports_nothing_from_evaluation_report_or_preparation():
    modules = imported_after("agree.train")
    assert "agree.callbacks" in modules and "agree.data.pixels" in modules  # what used to pull them in
    assert within(modules, ("agree.evaluate", "agree.report", "agree.prepare")) == []


def test_the_domain_imports_no_entry_point():
    """data/, model/ and retrieval/ never import an entry point (or the data preparation), nor the
    configuration layer above them: they take checked values as arguments."""
    assert "agree.data.datasets" in DOMAIN and "agree.retrieval.ground_truth" in DOMAIN
    above = (*ENTRY_POINTS, "agree.config", "agree.settings", "agree.schema")
    assert within(imported_after(*DOMAIN), above) == []


@pytest.mark.parametrize("entry", ["agree.evaluate", "agree.report"])
def test_evaluation_and_report_do_not_import_training(entry):
    assert within(imported_after(entry), ("agree.train", "agree.callbacks", "agree.prepare")) == []
