"""Entity text shared by training and evaluation."""

from __future__ import annotations

PROMPT_TEMPLATE = "a photo containing {entity}"
