"""Errors a user can act on.

Every error that a user's input can cause is raised as one of these classes with a message of
one sentence that names the file or argument and the fix. The command line prints the message
to stderr and exits with status 2, without a traceback; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = ["StemflowError", "InputError", "StorageError", "ResourceError", "AlreadyDone"]


class StemflowError(Exception):
    """Base class of the errors that the command line reports as one sentence."""


class InputError(StemflowError, ValueError):
    """A source, parameter or destination that cannot be used as given."""


class StorageError(StemflowError, OSError):
    """A store that cannot be reached, read or written (network, credentials, permissions).

    ``transient``: whether trying again later may succeed (an unreachable endpoint), or not
    until a user acts (refused credentials, a missing bucket); flows retry only the first.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class ResourceError(StemflowError):
    """A run that outgrew the machine: a task whose worker processes all died (out of memory)."""


class AlreadyDone(StemflowError):
    """The destination already holds this exact result; raised only where a caller asks for it."""
