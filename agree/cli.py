"""Errors a user can fix, shown as one line on stderr with a non-zero exit code, no traceback.

Every entry point runs its work inside :func:`user_errors`. ``HYDRA_FULL_ERROR=1`` shows the
traceback as well (the exception propagates, and Hydra prints it in full).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from omegaconf.errors import OmegaConfBaseException

from agree import prepare
from agree.checks import ConfigError
from agree.data.formats import DataFormatError, one_line
from agree.folders import FolderNotOwnedError

USER_ERRORS = (ConfigError, prepare.ConfigError, DataFormatError, FolderNotOwnedError, OmegaConfBaseException)


def _message(error: BaseException) -> str:
    if isinstance(error, OmegaConfBaseException):  # multi-line: message, full_key, object_type
        key = getattr(error, "full_key", None)
        return f"config error: {key + ': ' if key else ''}{str(error).splitlines()[0]}"
    kind = "config error" if isinstance(error, (ConfigError, prepare.ConfigError)) else "error"
    return f"{kind}: {one_line(error)}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors of ``USER_ERRORS`` into ``SystemExit("<one line>")`` (exit code 1)."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(_message(e)) from None
