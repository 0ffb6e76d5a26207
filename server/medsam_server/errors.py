"""The one exception type for input a user can fix.

It subclasses ValueError so library callers may catch either; the CLI turns it
into exit code 2 and the server into HTTP 422, each in one place.
"""


class InputError(ValueError):
    """Bad input: the message names what was wrong and, where it helps, where."""


class Cancelled(Exception):
    """A long run was stopped by its caller; nothing was written."""
