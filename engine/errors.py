"""The errors a user can cause, gathered for the CLI (one line, exit status 2) and the services (status codes).

Each lives beside the code that raises it; this module only lists them. Non-goals: defining new errors.
"""

from __future__ import annotations

from engine.session import SnapshotError
from engine.text import PromptTooLongError
from engine.video_io import VideoError
from engine.weights import CheckpointFormatError, CheckpointMismatchError, WeightsNotFoundError

USER_ERRORS: tuple[type[BaseException], ...] = (
    VideoError,
    PromptTooLongError,
    WeightsNotFoundError,
    CheckpointFormatError,
    CheckpointMismatchError,
    SnapshotError,
    FileNotFoundError,
    ValueError,
)
"""Caught at the CLI boundary. ValueError covers settings rejected by the configs' own checks."""

__all__ = [
    "USER_ERRORS",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "PromptTooLongError",
    "SnapshotError",
    "VideoError",
    "WeightsNotFoundError",
]
