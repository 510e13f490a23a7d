"""The console: library lines that are false, alarming without cause or advertisements, filtered here.

Every filter matches one message, narrowly, so a new warning of the same library still shows:

- Lightning's tips advertising its cloud loggers and model registry;
- Lightning's ```weights_only` was not set`` when it *saves* a checkpoint with the full training state
  (we load checkpoints with ``weights_only=True``; nothing is unpickled);
- Lightning's own call of a deprecated ``torch.utils._pytree`` API (``LeafSpec``), not ours to fix;
- open_clip's "Model initialized randomly" for a model whose weights are loaded right after
  (:func:`weights_loaded_after`).

The demo and the study also drop Lightning's informational lines (``GPU available``, ``Seed set``)
with :func:`quiet_lightning`: they print one line per stage of their own.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

LIGHTNING_NOISE = {  # the logger that emits each line (a filter on it holds whatever handlers exist)
    "lightning.pytorch.utilities.rank_zero": "💡 Tip: For seamless",  # litlogger, litmodels
    "lightning.pytorch.trainer.connectors.checkpoint_connector": "`weights_only` was not set",  # saving
}
LIBRARY_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)  # lightning's _pytree.py
RANDOM_INIT = "Model initialized randomly"  # open_clip.factory.create_model with pretrained=None


class _DropMessage(logging.Filter):
    """Drop the records whose message contains ``message``."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return self.message not in record.getMessage()


def quiet_libraries() -> None:
    """Install the filters above (idempotent); entry points call it once, before any work."""
    for name, message in LIGHTNING_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.message == message for f in logger.filters):
            logger.addFilter(_DropMessage(message))
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def quiet_lightning() -> None:
    """Show only Lightning's warnings and errors (for commands that print their own stage lines)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


@contextlib.contextmanager
def weights_loaded_after() -> Iterator[None]:
    """Within: open_clip's random-init warning is dropped, for a model whose weights we load next."""
    root, drop = logging.getLogger(), _DropMessage(RANDOM_INIT)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
