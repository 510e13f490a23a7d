"""The configured Lightning logger: a CSV history that survives a resume; W&B runs named, grouped and
tagged, resumable, offline without a key."""

from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path

import hydra
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from agree.atomic import atomic_path, write_json

WANDB_RUN_FILE = "wandb_run.json"  # in the run directory: the W&B run that `ckpt_path=last` resumes
NAME_EXCLUDES = ("hydra.", "output_dir=", "data.root=", "data.vg_root=", "ckpt_path=", "logger=")


def build_logger(cfg: DictConfig, resume_step: int = 0):
    """The ``logger`` group's logger, or False when there is none.

    ``resume_step``: the step a resumed run starts at; the CSV history keeps the rows of the steps
    before it (``HistoryCSVLogger``).
    """
    if cfg.get("logger") is None:
        return False
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    if logger_cfg["_target_"] == f"{HistoryCSVLogger.__module__}.{HistoryCSVLogger.__name__}":
        logger_cfg["resume_step"] = resume_step
    if not logger_cfg["_target_"].endswith("WandbLogger"):
        return hydra.utils.instantiate(logger_cfg)
    logger = hydra.utils.instantiate({**logger_cfg, **wandb_settings(cfg, logger_cfg)})
    logger.experiment.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)
    return logger


def wandb_settings(cfg: DictConfig, logger_cfg: dict) -> dict:
    """What the W&B run is called and where it resumes, for values the config leaves at null:

    - ``offline``: no API key configured (environment or netrc), so nothing prompts or waits;
    - ``group``: the Hydra sweep (its multirun folder), so a sweep's jobs sit together;
    - ``name``: the job's command-line overrides (``losses=agree,seed=1``);
    - ``tags``: method, losses switched on, model;
    - ``id``/``resume``: a resumed run (``ckpt_path`` set) continues the W&B run recorded in
      ``output_dir/wandb_run.json``; a fresh run records a new id there.
    """
    import wandb

    settings: dict = {}
    if logger_cfg.get("offline") is None:
        settings["offline"] = not wandb.login(prompt=False, verify=False)
    job = _hydra_job()
    if logger_cfg.get("group") is None and job and job["multirun"]:
        settings["group"] = job["sweep_dir"]
    if logger_cfg.get("name") is None and job and job["overrides"]:
        settings["name"] = ",".join(job["overrides"])
    if logger_cfg.get("tags") is None:
        settings["tags"] = run_tags(cfg)
    record = Path(cfg.output_dir) / WANDB_RUN_FILE
    if logger_cfg.get("id") is None:
        previous = _recorded_id(record) if cfg.get("ckpt_path") else None
        settings["id"] = previous or uuid.uuid4().hex[:12]
        settings["resume"] = "allow" if previous else None
        if not previous and rank_zero_only.rank == 0:
            write_json(record, {"id": settings["id"]})
    return settings


def run_tags(cfg: DictConfig) -> list[str]:
    """``method:<name>``, ``losses:<a>+<b>...`` (the ones with a weight above 0), ``model:<name>``."""
    from agree.settings import enabled_losses

    tags = [f"losses:{'+'.join(enabled_losses(cfg))}"]
    tags.append(f"model:{cfg.model.name}")
    if cfg.get("method"):  # the method group's option: agree or reference
        tags.insert(0, f"method:{cfg.method}")
    return tags


def _recorded_id(record: Path) -> str | None:
    try:
        return str(json.loads(record.read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _hydra_job() -> dict | None:
    """The sweep folder and the job's own overrides, when running under ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.lstrip("+~").startswith(NAME_EXCLUDES)]
    return {
        "multirun": hc.mode == RunMode.MULTIRUN,
        "sweep_dir": os.path.relpath(hc.sweep.dir) if not os.path.isabs(hc.sweep.dir) else hc.sweep.dir,
        "overrides": overrides,
    }


# ---------------------------------------------------------------------------------------------
# CSV history across a resume


def keep_history(path: Path, before_step: int) -> list[str]:
    """Cut ``metrics.csv`` to its header and the rows of the steps before ``before_step``, whenever
    they were written (bytes kept as they are; the file is left untouched when it has no other);
    return its columns. Values never span lines: numbers only."""
    with open(path, "rb") as f:
        lines = f.readlines()
    if not lines:
        return []
    columns = next(csv.reader([lines[0].decode()]))
    step = columns.index("step")
    kept = [line for line in lines[1:] if int(float(next(csv.reader([line.decode()]))[step])) < before_step]
    if len(kept) < len(lines) - 1:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"".join([lines[0], *kept]))
    return columns


class _HistoryWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the base __init__, instead of deleting the file
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if not self.resume_step:
            path.unlink()
            return
        self.metrics_keys = keep_history(path, self.resume_step)  # appended rows use the same columns


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows of an existing ``metrics.csv`` before ``resume_step``, and appends.

    A resumed run passes the step its checkpoint was written at (see ``agree.train.LastCheckpoint``):
    every row of the steps the checkpoint holds stays, whether it was written before the checkpoint
    or after it (a step's training loss is logged once its checkpoint is written); rows of later
    steps, which the resumed run logs again, go. A fresh run (``resume_step=0``) starts a new file.
    """

    def __init__(self, *args, resume_step: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self.resume_step)
        return self._experiment
