"""Folders the project makes: a folder is ours only if we made it (or found it empty), and marked it.

A folder is the project's when it holds ``MARKER``, written when a command claimed it, naming the
command (the owner), its settings and, for the folders that ``make clean`` may delete (the demo's,
the generated datasets), the files the owner writes there (``contents``, glob patterns relative to
the folder). A command writes only into a folder that is missing, empty, or marked by itself with
the same settings; ``python -m agree.folders remove=[PATH,...]`` (``make clean``) deletes a given
folder only if it is marked, declares its contents, and holds nothing else; any other folder is
kept, with the files that kept it named.

    python -m agree.folders 'remove=[outputs/demo,data/scenes-binding-64px-seed0-train1200]'
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agree.atomic import is_leftover, write_json
from agree.cli import run_command
from agree.errors import ConfigError, FolderNotOwnedError
from agree.runlock import LOCK

MARKER = ".agree-folder.json"
SHOWN = 5  # foreign files named when make clean keeps a folder


def _marker(folder: Path) -> dict | None:
    try:
        found = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def check_folder_path(folder: str | os.PathLike, key: str) -> None:
    """``folder`` is a folder, or can be made as one: one :class:`ConfigError` line naming ``key`` if
    a file stands in its way, a name or the path is too long, or its nearest folder is not writable.

    Writes nothing (``agree.runlock.lock_folder`` makes the folder, and reports what only trying
    finds, such as a file system that refuses new folders).
    """
    path = Path(os.path.abspath(folder))
    existing = path
    while not os.path.exists(existing) and existing != existing.parent:  # False on a name too long
        existing = existing.parent
    where = f"{key}={folder}"
    if not os.path.isdir(existing):
        raise ConfigError(f"{where}: {existing} is a file, not a folder; choose a folder")
    name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    for part in path.relative_to(existing).parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"{where}: the name {part[:40]}... is longer than {name_max} bytes; shorten it")
    if len(os.fsencode(path / LOCK)) >= path_max:
        raise ConfigError(f"{where}: the path is longer than {path_max} bytes; choose a shorter one")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {existing} is not writable; choose a folder you can write")


def check_outside(folder: str | os.PathLike, key: str, roots: Mapping[str, str | os.PathLike]) -> None:
    """``folder`` (links resolved) is neither one of the data folders ``roots`` (key -> path) nor
    inside one: a command never writes into the data it reads."""
    path = Path(os.path.realpath(folder))
    for root_key, root in roots.items():
        root_path = Path(os.path.realpath(root))
        if path == root_path or root_path in path.parents:
            raise FolderNotOwnedError(
                f"{key}={folder} lies in {root_key}={root} ({root_path}); outputs never go into "
                "a data folder: choose another folder"
            )


def check_claim(
    folder: str | os.PathLike,
    owner: str,
    params: dict[str, Any] | None = None,
    ignore: Iterable[str] = (),
) -> bool:
    """Whether ``owner`` may write into ``folder`` (True: it is already marked as ``owner``'s).

    Raises :class:`FolderNotOwnedError` for a folder that holds anything (but the lock file and the
    entries named in ``ignore``) without the marker, or one marked by another command or with other
    settings. Writes nothing.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderNotOwnedError(f"{folder}: not a folder; choose a new or empty folder")
    found = _marker(folder)
    if found is not None:
        if found.get("owner") == owner and found.get("params", {}) == (params or {}):
            return True
        raise FolderNotOwnedError(
            f"{folder}: made by agree {found.get('owner')} with other settings ({folder / MARKER}); "
            "delete it or choose another folder"
        )
    skipped = {LOCK, *ignore}
    if folder.is_dir() and any(entry.name not in skipped for entry in folder.iterdir()):
        raise FolderNotOwnedError(
            f"{folder}: not empty and not made by agree {owner} (no {MARKER}); "
            "refusing to write into it: choose a new or empty folder"
        )
    return False


def claim(
    folder: str | os.PathLike,
    owner: str,
    params: dict[str, Any] | None = None,
    contents: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> Path:
    """Make ``folder`` ``owner``'s: create and mark it if missing or empty (see ``check_claim``).

    ``contents``: the glob patterns of the files ``owner`` writes there, for a folder ``make clean``
    may delete; none for one it keeps. A marker written by an earlier version gets them.
    """
    folder = Path(folder)
    record = {"owner": owner, "params": params or {}}
    if contents:
        record["contents"] = list(contents)
    if not check_claim(folder, owner, params, ignore) or _marker(folder) != record:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MARKER, record)
    return folder


def _ours(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    return (
        parts[-1] in (MARKER, LOCK)
        or any(is_leftover(part) for part in parts)
        or any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns)
    )


def foreign_files(folder: str | os.PathLike, contents: Iterable[str]) -> list[str]:
    """The files and links under ``folder`` (relative, sorted) that the patterns ``contents`` (and
    the markers, lock files and writers' leftovers) do not cover; a link counts as foreign."""
    folder, patterns = Path(folder), list(contents)
    foreign = []
    for top, dirs, names in os.walk(folder):
        here = Path(top)
        links = [d for d in dirs if (here / d).is_symlink()]  # os.walk does not enter them
        for name in sorted([*names, *links]):
            relative = (here / name).relative_to(folder).as_posix()
            if (here / name).is_symlink() or not _ours(relative, patterns):
                foreign.append(relative)
    return sorted(foreign)


def remove_owned(folder: str | os.PathLike) -> str:
    """Delete ``folder`` if the project made it and it holds only what its marker's ``contents``
    cover; return what was done, as the line ``make clean`` prints."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return f"kept {folder} (not a folder; links are not followed)" if folder.exists() else ""
    found = _marker(folder)
    if found is None:
        return f"kept {folder} (not made by agree)"
    contents = found.get("contents")
    if not contents:
        return f"kept {folder} (made by agree {found.get('owner')}, whose outputs are kept)"
    foreign = foreign_files(folder, contents)
    if foreign:
        more = f", and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        return (
            f"kept {folder} (it holds files agree did not write there: {', '.join(foreign[:SHOWN])}{more}; "
            "move them out to remove it)"
        )
    shutil.rmtree(folder)
    return f"removed {folder}"


@dataclass
class RemoveConfig:
    """Delete the given folders that the project made, when they hold nothing else; keep every other one."""

    remove: list[str] = field(default_factory=list)  # the folders to delete if the project made them


def _remove(cfg: RemoveConfig) -> None:
    for path in cfg.remove:
        done = remove_owned(path)
        if done:
            print(done)


def main(argv: list[str] | None = None) -> None:
    """``python -m agree.folders remove=[PATH,...]``; ``--help`` says so."""
    run_command("python -m agree.folders", RemoveConfig, _remove, argv)


if __name__ == "__main__":
    main()
