"""The configuration of ``agree.train`` and ``agree.evaluate``, checked once, before any work.

``train_settings(cfg)`` and ``evaluate_settings(cfg)`` merge the composed Hydra config into its
schema (``agree.schema``: every key typed, unknown keys refused), check ranges, files, the model
and the device, and return one typed object with every value the entry point derives from them:
loss weights, data layout, resume path, model name and weights, image size, Trainer arguments,
device. Each failure raises :class:`ConfigError` with one line naming the key and what to do.
Files of ``data=synthetic`` are generated on demand, so only real data is checked on disk.

Model and Lightning code is imported inside the checks that need it: an evaluation from feature
files loads none.
"""

from agree.settings.common import ModelSettings, typed
from agree.settings.evaluation import EvaluateSettings, evaluate_settings
from agree.settings.training import (
    TrainSettings,
    config_loss_weights,
    device_batch_size,
    enabled_losses,
    train_settings,
)

__all__ = [
    "EvaluateSettings",
    "ModelSettings",
    "TrainSettings",
    "config_loss_weights",
    "device_batch_size",
    "enabled_losses",
    "evaluate_settings",
    "train_settings",
    "typed",
]
