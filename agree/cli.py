"""One command-line style for every entry point: ``key=value`` arguments, ``--help``, one-line errors.

``agree-train`` and ``agree-evaluate`` are Hydra applications (config groups, ``-m`` sweeps); the
other commands take the same ``key=value`` arguments, parsed by :func:`parse` against a dataclass
that lists their keys with types and defaults (OmegaConf's structured configs check the types).
Every entry point runs its work inside :func:`user_errors`: an error a user can fix is one line
on stderr with exit code 1; ``HYDRA_FULL_ERROR=1`` shows the traceback as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from typing import TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agree.errors import ConfigError, DataFormatError, FolderNotOwnedError, one_line

USER_ERRORS = (ConfigError, DataFormatError, FolderNotOwnedError, OmegaConfBaseException)
Config = TypeVar("Config")


def _message(error: BaseException) -> str:
    if isinstance(error, OmegaConfBaseException):  # multi-line: message, full_key, object_type
        key = getattr(error, "full_key", None)
        return f"config error: {key + ': ' if key else ''}{str(error).splitlines()[0]}"
    kind = "config error" if isinstance(error, ConfigError) else "error"
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


def _value(default: object) -> str:
    if default is MISSING:
        return "???"
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


def _default(field: dataclasses.Field) -> object:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return MISSING if field.default is dataclasses.MISSING else field.default


def describe(config: type) -> list[str]:
    """``key=default`` of every key of a config dataclass (``key=???`` when required), required first."""
    fields = sorted(dataclasses.fields(config), key=lambda f: _default(f) is not MISSING)
    return [f"{f.name}={_value(_default(f))}" for f in fields]


def usage(command: str, config: type, doc: str | None = None) -> str:
    """The ``--help`` text: the command, its first doc line and its keys with their defaults."""
    head = f"usage: {command} key=value ..."
    summary = (doc or config.__doc__ or "").strip().splitlines()
    return "\n".join([head, *summary[:1], "keys:", *(f"  {key}" for key in describe(config))])


def parse(command: str, config: type[Config], argv: list[str]) -> Config:
    """The ``config`` dataclass filled from ``key=value`` arguments, types checked.

    Raises :class:`ConfigError` with one line naming the argument (unknown key, not
    ``key=value``, a wrong type, a required key missing).
    """
    valid = {f.name for f in dataclasses.fields(config)}
    for pair in argv:
        key = pair.split("=", 1)[0]
        if "=" not in pair or key.split(".")[0] not in valid:
            problem = f"{pair!r} is not key=value" if "=" not in pair else f"unknown key {key!r}"
            raise ConfigError(f"{command}: {problem}; keys: {' '.join(describe(config))}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(config), OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{command}: {getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = " ".join(describe(config))
        raise ConfigError(f"{command}: missing required {', '.join(missing)}; keys: {keys}")
    return OmegaConf.to_object(cfg)


def run_command(
    command: str, config: type[Config], run, argv: list[str] | None = None, doc: str = ""
) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``config`` and call ``run(cfg)``.

    ``-h``/``--help`` prints :func:`usage`; user errors are one line (:func:`user_errors`).
    """
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage(command, config, doc))
        return
    with user_errors():
        run(parse(command, config, argv))
