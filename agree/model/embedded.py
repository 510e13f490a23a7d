"""The weights shipped with the package, named in configs as ``${agree_weights:NAME}``.

Kept apart from ``agree.model.clip`` so that a config naming them resolves without importing
open_clip (``agree.config`` registers the resolver for every command).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def embedded_weights(name: str) -> str:
    """Path of a weights file shipped with the package; configs write ``${agree_weights:NAME}``."""
    return str(WEIGHTS_DIR / f"{name}.safetensors")
