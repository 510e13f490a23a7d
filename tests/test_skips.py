"""Skips say why: `make test` prints each reason, a test needing ../shared/data fails under CI=true
when it is absent, and the slow tests run only in `make test-slow`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import shared_data

REPO = Path(__file__).resolve().parents[1]


def outcome(path: Path) -> BaseException | None:
    """What ``shared_data(path)`` raises: a skip or a failure (None when it returns the path)."""
    try:
        assert shared_data(path) == path
    except (pytest.skip.Exception, pytest.fail.Exception) as e:
        return e
    return None


def test_absent_shared_data_skips_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    skipped = outcome(tmp_path / "nowhere")
    assert isinstance(skipped, pytest.skip.Exception) and "nowhere" in str(skipped)
    assert outcome(tmp_path) is None


def test_absent_shared_data_fails_under_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    failed = outcome(tmp_path / "nowhere")
    assert isinstance(failed, pytest.fail.Exception), failed
    assert "nowhere" in str(failed) and "CI runs with ../shared/data" in str(failed)
    assert outcome(tmp_path) is None


def test_the_projects_pytest_options_print_skip_reasons_and_leave_slow_tests_out(tmp_path):
    (tmp_path / "test_example.py").write_text(
        "import pytest\n\n"
        "def test_skipped():\n    pytest.skip('the reason it gives')\n\n"
        "@pytest.mark.slow\ndef test_slow():\n    pass\n"
    )

    def pytest_run(*args: str) -> str:
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
        ]
        done = subprocess.run([*command, *args, str(tmp_path)], capture_output=True, text=True, timeout=300)
        return done.stdout

    default = pytest_run()  # what `make test` runs
    assert re.search(r"SKIPPED \[1\] \S*test_example.py:4: the reason it gives", default), default
    assert "1 skipped, 1 deselected" in default
    assert "1 passed, 1 deselected" in pytest_run("-m", "slow")  # what `make test-slow` runs
