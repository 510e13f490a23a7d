"""Row 16: every data-format and config error of an entry point is one line on stderr, exit code 1,
no traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback too."""

import os
import subprocess
import sys

import pytest

from .conftest import SUBPROCESS_LIMIT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "CI": "true"}


def run(tmp_path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *argv, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_LIMIT,
    )


@pytest.fixture
def bad_annotations(tmp_path):
    """A texts file whose second line is not JSON, and features for the evaluation."""
    (tmp_path / "texts.jsonl").write_text(
        '{"query_id": 0, "query_text": "a", "item_ids": [1]}\n{"query_id": 1,\n'
    )
    (tmp_path / "images.jsonl").write_text('{"image_id": 1, "item_ids": [0]}\n')
    (tmp_path / "features.jsonl").write_text('{"image_id": "1", "feature": [1.0]}\n')
    return [
        "agree.evaluate",
        f"annotations.texts={tmp_path / 'texts.jsonl'}",
        f"annotations.images={tmp_path / 'images.jsonl'}",
        f"features.image_jsonl={tmp_path / 'features.jsonl'}",
        f"features.text_jsonl={tmp_path / 'features.jsonl'}",
    ]


def test_a_data_format_error_is_one_line(tmp_path, bad_annotations):
    done = run(tmp_path, *bad_annotations)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / 'texts.jsonl'}:2: malformed JSON (")


@pytest.mark.parametrize(
    "argv, line",
    [
        (["agree.train", "data=flickr30k"], "config error: data.root is not set: give data.root="),
        (
            ["agree.train", "+experiment=demo", "data.batch_size=${nope}"],
            "config error: data.batch_size: Interpolation key 'nope' not found",
        ),
    ],
)
def test_a_config_error_is_one_line(tmp_path, argv, line):
    done = run(tmp_path, *argv)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(line), done.stderr


def test_hydra_full_error_still_shows_the_traceback(tmp_path, bad_annotations):
    done = run(tmp_path, *bad_annotations, HYDRA_FULL_ERROR="1")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "DataFormatError" in done.stderr and "malformed JSON" in done.stderr
