"""The ``CODEQ_*`` environment switches, all read one way (a leaf module)."""

from __future__ import annotations

import os

__all__ = ["env_flag"]

_OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The switch ``name``: unset or empty gives ``default``; 0, false, no or
    off (any case) False; anything else True."""
    v = os.environ.get(name, "").strip().lower()
    return default if not v else v not in _OFF
