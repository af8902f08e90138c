"""The one base of every mistake a user can fix, at the bottom of the import graph.

Config, data, checkpoint, launch-environment, job and kernel errors derive from :class:`UserError`;
the CLI prints any of them as one line and exits 2, without importing the modules that raise them.
Anything else that escapes a command is a failure of the job (exit 1, with each rank's report).
"""

from __future__ import annotations

__all__ = ["UserError", "first_line"]


class UserError(Exception):
    """A mistake in the user's input (config, files, flags, cluster): reported as one line, exit 2."""


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its class name when it has none), for one-line reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
