"""Folders the project makes (the demo's, the generated datasets): marked, so only those are replaced.

A folder is the project's when it holds ``MARKER``, written when the project claimed it, naming
the tool and its settings. A tool writes only into a folder that is missing, empty, or marked by
itself with the same settings; ``python -m agree.folders remove=[PATH,...]`` (``make clean``)
deletes the given folders that carry a marker and keeps every other one.

    python -m agree.folders 'remove=[outputs/demo,data/scenes-binding-64px-seed0-train1200]'
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agree.atomic import write_json
from agree.cli import run_command
from agree.errors import FolderNotOwnedError

MARKER = ".agree-folder.json"


def _marker(folder: Path) -> dict | None:
    try:
        found = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def check_claim(folder: str | os.PathLike, owner: str, params: dict[str, Any] | None = None) -> bool:
    """Whether ``owner`` may write into ``folder`` (True: it is already marked as ``owner``'s).

    Raises :class:`FolderNotOwnedError` for a non-empty folder without the marker, or one marked by
    another tool or with other settings. Writes nothing.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderNotOwnedError(f"{folder}: not a folder; choose a new or empty folder")
    wanted = {"owner": owner, "params": params or {}}
    found = _marker(folder)
    if found == wanted:
        return True
    if found is not None:
        raise FolderNotOwnedError(
            f"{folder}: made by agree {found.get('owner')} with other settings ({folder / MARKER}); "
            "delete it or choose another folder"
        )
    if folder.is_dir() and any(folder.iterdir()):
        raise FolderNotOwnedError(
            f"{folder}: not empty and not made by agree {owner} (no {MARKER}); "
            "refusing to write into it: choose a new or empty folder"
        )
    return False


def claim(folder: str | os.PathLike, owner: str, params: dict[str, Any] | None = None) -> Path:
    """Make ``folder`` ``owner``'s: create and mark it if missing or empty (see ``check_claim``)."""
    folder = Path(folder)
    if not check_claim(folder, owner, params):
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MARKER, {"owner": owner, "params": params or {}})
    return folder


def check_entries(folder: str | os.PathLike, owner: str, names: Iterable[str]) -> bool:
    """Whether ``owner`` may replace the entries ``names`` of ``folder`` (True: already marked as its).

    Unlike ``check_claim`` the folder may hold anything else (Hydra's ``.hydra/``, logs, a user's
    files); only an entry of ``names`` that ``owner`` did not write (no marker, or another owner's
    folder) is refused, with :class:`FolderNotOwnedError`. Writes nothing.
    """
    folder = Path(folder)
    found = _marker(folder)
    if found is not None and found.get("owner") == owner:
        return True
    taken = [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if found is not None or taken:
        what = (
            f"{taken[0]}, not written by agree {owner}"
            if taken
            else f"a marker of agree {found.get('owner')}"
        )
        raise FolderNotOwnedError(f"{folder}: holds {what}; refusing to replace it: choose another folder")
    return False


def claim_entries(folder: str | os.PathLike, owner: str, names: Iterable[str]) -> None:
    """Mark ``folder`` as the place of ``owner``'s entries ``names`` (see ``check_entries``)."""
    if not check_entries(folder, owner, names):
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_json(Path(folder) / MARKER, {"owner": owner, "params": {}})


def remove_owned(folder: str | os.PathLike) -> bool:
    """Delete ``folder`` if the project made it (it holds ``MARKER``); return whether it did."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir() or _marker(folder) is None:
        return False
    shutil.rmtree(folder)
    return True


@dataclass
class RemoveConfig:
    """Delete the given folders that the project made (they hold its marker); keep every other one."""

    remove: list[str] = field(default_factory=list)  # the folders to delete if the project made them


def _remove(cfg: RemoveConfig) -> None:
    for path in cfg.remove:
        if remove_owned(path):
            print(f"removed {path}")
        elif Path(path).exists():
            print(f"kept {path} (not made by agree)")


def main(argv: list[str] | None = None) -> None:
    """``python -m agree.folders remove=[PATH,...]``; ``--help`` says so."""
    run_command("python -m agree.folders", RemoveConfig, _remove, argv)


if __name__ == "__main__":
    main()
