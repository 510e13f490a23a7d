"""One command-line style for every entry point: ``key=value`` arguments, ``--help``, one-line errors.

``agree-train`` and ``agree-evaluate`` are Hydra applications (config groups, ``-m`` sweeps); the
other commands take the same ``key=value`` arguments, parsed by :func:`parse` against a dataclass
that lists their keys with types and defaults (OmegaConf's structured configs check the types;
nested dataclasses take dotted keys, ``corpus.seed=1``). A command that composes the training or
evaluation config (the demo, the study) has an ``overrides`` key: every argument that names none
of its own keys (``data.synthetic.train_images=100``, ``+debug=default``) is appended to it and
goes to Hydra. Every entry point runs its work inside :func:`user_errors`: an error a user can fix
is one line on stderr with exit code 1; ``HYDRA_FULL_ERROR=1`` shows the traceback as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
from collections.abc import Iterator
from typing import TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agree.console import quiet_libraries
from agree.errors import ConfigError, DataFormatError, FolderNotOwnedError, one_line
from agree.workers import die_with_parent

USER_ERRORS = (ConfigError, DataFormatError, FolderNotOwnedError, OmegaConfBaseException)
OVERRIDES = "overrides"  # the key that collects the arguments naming none of a command's keys
Config = TypeVar("Config")


def _hydra_errors() -> tuple[type[BaseException], ...]:
    """Hydra's errors of ``compose`` (a bad override, an unknown group option), once Hydra is loaded.

    Looked up in ``sys.modules`` rather than imported: a command that never loads Hydra (the data
    preparation) should not pay for its import, and cannot raise its errors.
    """
    errors = sys.modules.get("hydra.errors")
    return (errors.CompactHydraException,) if errors else ()


def _message(error: BaseException) -> str:
    if isinstance(error, OmegaConfBaseException):  # multi-line: message, full_key, object_type
        key = getattr(error, "full_key", None)
        return f"config error: {key + ': ' if key else ''}{str(error).splitlines()[0]}"
    kind = "error" if isinstance(error, DataFormatError | FolderNotOwnedError) else "config error"
    return f"{kind}: {one_line(error)}"


def freeze_imports() -> None:
    """Keep the garbage collector from walking the objects alive now, once per process.

    An entry point calls it when its imports are done: torch alone leaves about a million objects,
    which every later full collection, and the interpreter's last one at exit, would walk again
    (0.5 s at the exit of an evaluation from feature files, measured on 2 cores). Later calls (the
    next job of a multirun) freeze nothing more, so no garbage of an earlier job is kept.
    """
    if gc.get_freeze_count() == 0:
        gc.freeze()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors of ``USER_ERRORS`` and Hydra's composition errors into ``SystemExit("<one line>")``
    (exit code 1)."""
    try:
        yield
    except (*USER_ERRORS, *_hydra_errors()) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(_message(e)) from None


def _value(default: object) -> str:
    if default is MISSING:
        return "???"
    if isinstance(default, list | tuple):  # as it is typed: [a,b]
        return "[" + ",".join(_value(v) for v in default) + "]"
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


def _default(field: dataclasses.Field) -> object:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return MISSING if field.default is dataclasses.MISSING else field.default


def describe(config: type | object, prefix: str = "") -> list[str]:
    """``key=default`` of every key of a config dataclass (``key=???`` when required), required first.

    The keys of a nested dataclass are listed as ``outer.inner=default``.
    """
    defaults = {
        f.name: _default(f) if isinstance(config, type) else getattr(config, f.name)
        for f in dataclasses.fields(config)
    }
    lines = []
    for name, default in sorted(defaults.items(), key=lambda item: item[1] is not MISSING):
        if dataclasses.is_dataclass(default):
            lines += describe(default, f"{prefix}{name}.")
        else:
            lines.append(f"{prefix}{name}={_value(default)}")
    return lines


def usage(command: str, config: type, doc: str | None = None) -> str:
    """The ``--help`` text: the command, its first doc line and its keys with their defaults."""
    head = f"usage: {command} key=value ..."
    summary = (doc or config.__doc__ or "").strip().splitlines()
    return "\n".join([head, *summary[:1], "keys:", *(f"  {key}" for key in describe(config))])


def _writable(node: DictConfig) -> DictConfig:
    """``node`` with the read-only flag of every level cleared (a frozen dataclass sets it on its node)."""
    OmegaConf.set_readonly(node, False)
    for key in node:
        if not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
            _writable(node[key])
    return node


def _positional_as_key(config: type, argv: list[str]) -> list[str]:
    """``argv`` with a lone positional argument spelled as ``key=value`` of the one required key.

    ``agree-report outputs/demo`` then means ``agree-report directory=outputs/demo``; a command with
    no or several required keys, or a second positional argument, is left to the usual errors.
    """
    required = [f.name for f in dataclasses.fields(config) if _default(f) is MISSING]
    positional = [i for i, a in enumerate(argv) if "=" not in a and not a.startswith("~")]
    if len(required) != 1 or len(positional) != 1 or any(a.startswith(f"{required[0]}=") for a in argv):
        return argv
    i = positional[0]
    return [*argv[:i], f"{required[0]}={argv[i]}", *argv[i + 1 :]]


def parse(command: str, config: type[Config], argv: list[str]) -> Config:
    """The ``config`` dataclass filled from ``key=value`` arguments, types checked.

    A lone positional argument fills the one required key, if the command has exactly one.
    When ``config`` has an ``overrides`` list, the arguments that name none of its keys are
    appended to it as they are (Hydra checks them). Raises :class:`ConfigError` with one line
    naming the argument (unknown key, not ``key=value``, a wrong type, a required key missing).
    """
    valid = {f.name for f in dataclasses.fields(config)}
    own, passed = [], []
    for pair in _positional_as_key(config, argv):
        key = pair.split("=", 1)[0]
        if key.split(".")[0] in valid and "=" in pair:
            own.append(pair)
        elif OVERRIDES in valid and ("=" in pair or pair.startswith("~")):  # ~key: Hydra's deletion
            passed.append(pair)
        else:
            problem = f"{pair!r} is not key=value" if "=" not in pair else f"unknown key {key!r}"
            raise ConfigError(f"{command}: {problem}; keys: {' '.join(describe(config))}")
    try:
        cfg = OmegaConf.merge(_writable(OmegaConf.structured(config)), OmegaConf.from_dotlist(own))
        if passed:
            cfg[OVERRIDES] = [*cfg[OVERRIDES], *passed]
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
    freeze_imports()
    quiet_libraries()
    die_with_parent()  # loader workers end with the command, however it ends
    with user_errors():
        run(parse(command, config, argv))
