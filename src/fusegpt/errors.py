"""The project's own error types: what a user did (or can fix), as opposed to bugs.

Every error fusegpt raises on purpose for bad input, a refused operation or a known failure is a
:class:`FusegptError`. The command line prints those as one line (with their :attr:`exit_code`,
2 unless the class says otherwise) and shows a traceback for everything else: any other exception
is a bug, and hiding it behind a usage message would cost the user the one thing that helps us fix
it. ``--debug`` (or ``FUSEGPT_DEBUG=1``) shows the traceback of a :class:`FusegptError` too.

Each class also derives from the built-in error a caller would expect (``ValueError``,
``FileExistsError``, ...), so code written against those keeps working.
"""

from __future__ import annotations


class FusegptError(Exception):
    """Bad input, or an operation fusegpt refuses; the message names the problem and the fix."""

    exit_code: int = 2


class ConfigError(FusegptError, ValueError):
    """A setting is out of range or inconsistent; the message names the fix."""


class DataError(FusegptError, ValueError):
    """A data source is missing, empty or too short; the message names the fix."""


class ModelLoadError(FusegptError, ValueError):
    """The model could not be found, read or is not supported; the message says what to do."""


class OutputExistsError(FusegptError, FileExistsError):
    """The output exists and may not (or must not) be replaced; the message says why."""


class OutputNotWritableError(FusegptError, PermissionError):
    """The output's place cannot be written (or holds too little free space); found before any long work."""


class OutputLockedError(FusegptError, BlockingIOError):
    """Another fusegpt run is writing the same output right now."""


class RunStateError(FusegptError, ValueError):
    """A kept run state cannot be used as asked (exists without --resume, corrupt, other settings)."""


class SaveError(FusegptError, OSError):
    """Writing the result failed after the work; the message says where the result was kept instead."""

    exit_code = 1


class ReportError(FusegptError, ValueError):
    """A file given as a fusegpt report (or recipe) is not one, or is from a newer fusegpt."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture has no adapter (or not the layout an operation needs)."""


class TrainingDiverged(FusegptError, FloatingPointError):
    """Training produced a non-finite loss; the message names the setting to lower."""

    exit_code = 1
