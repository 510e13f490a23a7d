import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from agree.data.synthetic import SceneConfig, generate  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(path: Path) -> Path:
    """``path`` under ``SHARED_DATA`` (real third-party samples, read in place), for the tests that
    need it: when it is absent the test is skipped saying so, or fails under ``CI=true``, where the
    folder is always beside the checkout."""
    if not path.exists():
        message = f"{path} is not here (the real samples of ../shared/data)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI runs with ../shared/data beside the checkout", pytrace=False)
        pytest.skip(message)
    return path


# Seconds a subprocess of a test may run: far above any one's quiet time (under a minute), so that a
# machine loaded by other work slows the suite down without failing it.
SUBPROCESS_LIMIT = 900
SMALL_SCENES = SceneConfig(seed=3, train_images=60, val_images=12, test_images=20, vg_images_per_word=2)


@pytest.fixture(autouse=True)
def feature_cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Each test's own cache of parsed feature files (``cache_dir``'s default follows
    ``XDG_CACHE_HOME``, also in the commands a test starts): the suite never writes to ~/.cache."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder / "agree"


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    """A small generated release (64 px), shared by the tests that only read it."""
    return generate(tmp_path_factory.mktemp("scenes"), SMALL_SCENES)
