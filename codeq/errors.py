"""The errors the command-line tools print as one ``error: ...`` line (never a
traceback): a user mistake (exit code 2) and a diverged run (exit code 3)."""

from __future__ import annotations

__all__ = ["ConfigError", "TrainingDiverged", "ExportError", "DIVERGED_EXIT_CODE"]

# run_training.py's exit code when training stops on a non-finite loss.
DIVERGED_EXIT_CODE = 3


class ConfigError(Exception):
    """A user mistake in the config, the command line or what they name (data
    set path, device, checkpoint, weights file).  The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ExportError(RuntimeError):
    """An export could not be written or read: missing, corrupt or truncated
    files, a SHA-256 mismatch, an unknown format, a weight not stored as
    integers.  The message is one line."""


class TrainingDiverged(RuntimeError):
    """Training stopped at the first non-finite loss.  ``epoch`` and ``step``
    are 1-based; ``term`` names what went non-finite (the cross-entropy, a loss
    term or the total loss); the message is one line."""

    def __init__(self, message: str, epoch: int, step: int, term: str):
        super().__init__(" ".join(str(message).split()))
        self.epoch, self.step, self.term = epoch, step, term
