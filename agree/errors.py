"""The errors a user can fix, each shown as one line (see ``agree.cli.user_errors``).

They sit at the bottom of the package: any module may raise them without importing another
layer.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad command line or setting; the message is one line naming the key and what is valid."""


class DataFormatError(ValueError):
    """A data file is malformed; the message is one line: ``file[:line]: what is wrong``."""


class FolderNotOwnedError(ValueError):
    """A folder the project did not make, or made with other settings; the message is one line."""


class FolderInUseError(FolderNotOwnedError):
    """An output folder another live process is writing (it holds the folder's lock)."""


def one_line(error: BaseException) -> str:
    """An exception's message with its whitespace (newlines included) collapsed."""
    return " ".join(str(error).split()) or type(error).__name__
