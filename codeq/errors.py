"""The error for a user mistake: a one-line message that the command-line
tools print as ``error: ...`` with exit code 2 (never a traceback)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A user mistake in the config, the command line or what they name (data
    set path, device, checkpoint, weights file).  The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
