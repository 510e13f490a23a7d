"""The folders a run writes, made safe before any work: checked, locked and claimed; the run's
record (``.hydra/``) written only once the command is accepted.

Left to itself, Hydra makes ``hydra.run.dir``, opens its log there and writes ``.hydra/`` before
the task starts, so a refused command would already have rewritten a finished run's record. Our
configs set ``hydra.output_subdir: null``, and:

1. ``RunFolderCheck`` (a Hydra callback, at ``on_run_start``: before Hydra makes the folder or opens
   its log) checks ``hydra.run.dir`` (``check_output_folder``) and locks it (``agree.runlock``);
2. the task checks its config, then ``output_folders`` checks ``output_dir`` the same way, and
   locks and claims (``agree.folders``) every folder it writes;
3. the command's checks of what a folder holds (a finished run, a run without ``ckpt_path=last``)
   run under the lock;
4. ``HydraRun.write_record`` writes ``.hydra/`` as Hydra would have.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from agree.atomic import atomic_path
from agree.cli import user_errors
from agree.data.layout import resolve_path
from agree.folders import MARKER, check_claim, check_folder_path, check_outside, claim
from agree.runlock import LOCK, is_first_process, lock_folder, locked, unlock_folder

RECORD = ".hydra"  # the run's record: config.yaml, hydra.yaml, overrides.yaml
DATA_KEYS = ("data.root", "data.vg_root")  # the data folders no output may lie in


def data_roots(cfg: DictConfig) -> dict[str, Path]:
    """The data folders ``cfg`` names (key -> path); keys it cannot resolve yet are left out."""
    roots = {}
    for key in DATA_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, str) and value:
            roots[key] = resolve_path(value)
    return roots


def check_output_folder(
    folder: Path, key: str, owner: str, roots: Mapping[str, Path], ignore: tuple[str, ...] = ()
) -> None:
    """``folder`` can be written, lies outside the data folders ``roots``, and is new, empty (but
    ``ignore``) or ``owner``'s; one line naming ``key`` otherwise. Writes nothing."""
    check_folder_path(folder, key)
    check_outside(folder, key, roots)
    check_claim(folder, owner, ignore=ignore)


@dataclass(frozen=True)
class HydraRun:
    """The ``@hydra.main`` run a task belongs to: its folder, its log file and its record."""

    folder: Path
    log: str  # the name of Hydra's job log in ``folder``
    record: dict[str, str]  # the files of ``.hydra/`` as Hydra writes them: name -> YAML

    @classmethod
    def of(cls, cfg: DictConfig) -> HydraRun | None:
        """The run of the task given ``cfg``, read before the task changes it; None outside
        ``@hydra.main`` and in the processes of rank above 0 (they write no record)."""
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized() or not is_first_process():
            return None
        hydra = HydraConfig.get()
        return cls(
            Path(hydra.runtime.output_dir),
            f"{hydra.job.name}.log",
            {
                "config.yaml": OmegaConf.to_yaml(cfg),
                "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
                "overrides.yaml": OmegaConf.to_yaml(hydra.overrides.task),
            },
        )

    def write_record(self, into: Path | None = None) -> None:
        """Write ``.hydra/`` into ``into`` (default: the run's folder), each file atomically."""
        for name, text in self.record.items():
            with atomic_path((into or self.folder) / RECORD / name) as tmp:
                tmp.write_text(text, encoding="utf-8")


def _same(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def output_folders(
    owner: str, folders: Mapping[str, Path], roots: Mapping[str, Path], run: HydraRun | None = None
) -> Iterator[None]:
    """Check every output folder (key -> path), then hold their locks and claim them for the block.

    Hydra's log in the run's folder does not make it non-empty. Processes of rank above 0 only check.
    """

    def ignore(folder: Path) -> tuple[str, ...]:
        return (run.log,) if run is not None and _same(folder, run.folder) else ()

    unique: dict[str, Path] = {}  # a folder given twice counts once, under its first key
    for key, folder in folders.items():
        if not any(_same(folder, seen) for seen in unique.values()):
            unique[key] = folder
    for key, folder in unique.items():
        check_output_folder(folder, key, owner, roots, ignore(folder))
    if not is_first_process():
        yield
        return
    made = [folder for folder in unique.values() if not folder.exists()]
    try:
        with locked(unique.values()):
            for folder in unique.values():
                claim(folder, owner, ignore=ignore(folder))  # checked again, under the lock
            yield
    except BaseException:
        for folder in made:  # a refused or failed command leaves no folder of its own behind
            _remove_if_bare(folder)
        raise


def _remove_if_bare(folder: Path) -> None:
    """Remove ``folder`` when it holds nothing but our marker and lock (a folder this command made)."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else None
    if names is None or not names <= {MARKER, LOCK}:
        return
    for name in names:
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


class RunFolderCheck(Callback):
    """Hydra callback: check and lock ``hydra.run.dir`` before Hydra makes it or writes into it."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.folder: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_process():
            return
        folder = Path(os.path.abspath(config.hydra.run.dir))
        with user_errors():  # Hydra turns a callback's exceptions into warnings, not SystemExit
            log = f"{config.hydra.job.name}.log"
            check_output_folder(folder, "hydra.run.dir", self.owner, data_roots(config), (log,))
            lock_folder(folder)
        self.folder = folder

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.folder is not None:
            unlock_folder(self.folder)
            self.folder = None
