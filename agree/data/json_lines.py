"""JSON and JSON-lines reading with validation: every failure is one line naming the file and line.

A bad file raises :class:`~agree.errors.DataFormatError` (``file[:line]: what is wrong``); no other
exception escapes a reader, whatever the bytes (``tests/test_readers_fuzz.py``). Ids are compared
as integers when numeric (:func:`canonical_id`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from agree.errors import DataFormatError, one_line


def canonical_id(value: Any) -> str:
    """Ids are compared as integers when numeric ("0042" == 42), else as strings."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"an id is an integer or a string, not {type(value).__name__}")
    if isinstance(value, int):
        return str(value)
    return (value.lstrip("0") or "0") if value.isascii() and value.isdigit() else value


def show(value: Any) -> str:
    """``value`` for a one-line message: as is when printable, else its repr."""
    text = str(value)
    return text if text.isprintable() else repr(text)


SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_name(name: Any, where: str) -> str:
    """``name``, when it is safe as part of a file name (``[A-Za-z0-9_.-]``, no ``..``)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise DataFormatError(
            f"{where}: {show(name)} cannot be part of a file name "
            "(letters, digits, '_', '.' and '-' only, no '..')"
        )
    return name


def valid_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (JSON's ``\\ud800`` escapes give lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_fields(obj: Any, fields: dict[str, type | tuple[type, ...]], where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, kind in fields.items():
        if key not in obj:
            raise DataFormatError(f"{where}: missing key {key!r} (keys present: {sorted(obj)})")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise DataFormatError(f"{where}: key {key!r} should be {names}, got {type(value).__name__}")
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def json_loads(text: str | bytes, where: str, line_in_error: bool = False) -> Any:
    """``json.loads`` with every failure as a one-line DataFormatError (NaN/Infinity are not JSON)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if line_in_error else where
        raise DataFormatError(f"{at}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataFormatError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # NaN/Infinity, integers of thousands of digits, invalid UTF-8
        raise DataFormatError(f"{where}: {one_line(e)}") from None


def nonblank_lines(path: str | os.PathLike, file: BinaryIO | None = None) -> Iterator[tuple[str, bytes]]:
    """(``file:line``, raw line with its end) of each non-blank line of ``path``, read from ``file``
    (an open binary file of it; default: opened here). Each line is read once, never copied."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        # a 1 MB buffer: with the default 8 kB, reading the release's 100 kB lines took 4x as long
        with open(path, "rb", buffering=1 << 20) if file is None else contextlib.nullcontext(file) as f:
            for number, line in enumerate(f, start=1):
                if not _blank(line):
                    yield f"{path}:{number}", line
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({one_line(e)})") from None


def _blank(line: bytes) -> bool:
    """Whether ``line`` holds only ASCII whitespace (its first byte tells, but for blank lines: a
    ``strip`` of every line would copy it)."""
    return line[:1] in _WHITESPACE and not line.strip()


_WHITESPACE = (b"", b" ", b"\t", b"\r", b"\n", b"\x0b", b"\x0c")


def decode_utf8(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{where}: not UTF-8 text (invalid byte at position {e.start})") from None


def checked_rows(
    path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]
) -> list[tuple[str, dict]]:
    """(``file:line``, object) of every line; each must be an object holding ``fields``."""
    rows = [
        (where, check_fields(json_loads(decode_utf8(line, where), where), fields, where))
        for where, line in nonblank_lines(path)
    ]
    if not rows:
        raise DataFormatError(f"{path}: no records")
    return rows


def first_row(path: str | os.PathLike) -> tuple[str, dict]:
    """(``file:line``, object) of the first line of a JSON-lines file; the rest is not read."""
    for where, line in nonblank_lines(path):
        return where, check_fields(json_loads(decode_utf8(line, where), where), {}, where)
    raise DataFormatError(f"{path}: no records")


def read_jsonl(path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Read a JSON-lines file; every line must be an object holding ``fields`` with those types."""
    return [row for _, row in checked_rows(path, fields)]


def read_json(path: str | os.PathLike) -> Any:
    """Read one JSON document with a one-line error on failure."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read ({one_line(e)})") from None
    return json_loads(decode_utf8(raw, str(path)), str(path), line_in_error=True)


def string_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"{where}: {key!r} must be a list of strings")
    return list(value)


def parse_id(value: Any, where: str, key: str) -> str:
    try:
        out = canonical_id(value)
    except TypeError:
        raise DataFormatError(f"{where}: {key!r} must be an id (integer or string)") from None
    if not valid_unicode(out):
        raise DataFormatError(f"{where}: {key!r} {show(out)} is not valid Unicode (a lone surrogate escape)")
    return out


def parse_id_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list):
        raise DataFormatError(f"{where}: {key!r} must be a list of ids")
    return [parse_id(v, where, key) for v in value]


def check_unique(ids: list[str], wheres: list[str], key: str) -> None:
    """Fail at the second occurrence of an id; ``wheres[i]`` locates ``ids[i]``."""
    seen = set()
    for value, where in zip(ids, wheres, strict=True):
        if value in seen:
            raise DataFormatError(f"{where}: duplicate {key} {show(value)}")
        seen.add(value)


def json_id(value: str) -> int | str:
    return int(value) if value.isascii() and value.isdigit() else value
