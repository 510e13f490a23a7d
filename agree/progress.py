"""Progress bars for a person at a terminal; plain and quiet under CI or when output is redirected."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def interactive() -> bool:
    """True when stdout and stderr are terminals and ``CI`` is not set (``CI=false`` counts as unset)."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``iterable`` with a transient progress bar, shown only when ``interactive()``."""
    return iter(tqdm(iterable, desc=desc, total=total, disable=not interactive(), leave=False))
