"""The shim's one warning category, pointed at the user's code rather than the shim's."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class UnslothQwenCompatWarning(UserWarning):
    """The shim could not fully do its job in this process."""


def _importlib_internal(filename: str) -> bool:
    # The frames warnings.warn itself passes over when it walks up ``stacklevel`` frames.
    return "importlib" in filename and "_bootstrap" in filename


def _stacklevel_of_caller_outside_package() -> int:
    """``stacklevel`` that makes ``warnings.warn`` in :func:`warn` name the first frame
    outside this package: the user's ``import unsloth_qwen_compat`` line when the warning
    comes from the import-time work, however many package and importlib frames lie between.
    """
    frame, level = sys._getframe(1), 1  # warn(): the frame that calls warnings.warn
    while frame is not None and (
        _importlib_internal(frame.f_code.co_filename) or frame.f_code.co_filename.startswith(_PACKAGE_DIR)
    ):
        frame = frame.f_back
        if frame is not None and not _importlib_internal(frame.f_code.co_filename):
            level += 1
    return level if frame is not None else 1


def warn(message: str) -> None:
    """Warn with :class:`UnslothQwenCompatWarning`, attributed to the caller's own code."""
    warnings.warn(message, UnslothQwenCompatWarning, stacklevel=_stacklevel_of_caller_outside_package())
