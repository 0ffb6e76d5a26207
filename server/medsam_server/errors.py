"""Domain errors: what went wrong, in words a user can act on; no HTTP here.

The CLI turns :class:`InputError` into exit code 2 (``cli.py``); the server maps
every class below to a status code in one table (``api.ERRORS``).
"""

import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80


def shown(value) -> str:
    """A short repr of a value a client sent: an error names it without repeating megabytes of it."""
    return _SHORT.repr(value)


#: An error message repeats at most this much of what was wrong (a bad value may be megabytes long).
MAX_ERROR_CHARS = 1000


def capped(message: str) -> str:
    """``message`` cut to :data:`MAX_ERROR_CHARS`, saying how long it was: what a request or a job answers."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}... ({len(message)} characters in all)"


class InputError(ValueError):
    """Bad input: the message names what was wrong and, where it helps, where."""


class Cancelled(Exception):
    """A long run was stopped by its caller; nothing was written."""


class WireError(Exception):
    """A request body that breaks the wire protocol (not an envelope, truncated, bad JSON)."""


class TooLarge(WireError):
    """A body, header or array beyond the server's limits."""


class Unsupported(WireError):
    """A content type, dtype or compression the protocol does not accept."""


class UnknownSession(LookupError):
    """No such session for this caller (never says whether it exists for someone else)."""


class UnknownJob(LookupError):
    """No such job in this session."""


class Busy(RuntimeError):
    """The server holds as much as it may; the message says what to free."""


class NotFinished(RuntimeError):
    """A job's result was asked for before the job ended."""


class VersionMismatch(RuntimeError):
    """The client speaks another API version."""


class Unauthorized(Exception):
    """No token where the server needs one."""


class Forbidden(Exception):
    """A token the server does not know."""


class SessionLost(LookupError):
    """The session's replica stopped (``medsam serve --replicas``): its volume and embeddings are gone; upload again."""


class NoReplica(RuntimeError):
    """No model replica is running (``medsam serve --replicas``): Ray Serve is starting them again; retry shortly."""
