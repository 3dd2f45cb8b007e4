"""The one error type of the checkpoint package."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A model directory or file is missing, unreadable or inconsistent.

    The message names the file (and key) and says what was expected. A ValueError, so the CLI
    prints it as a clean user error.
    """
