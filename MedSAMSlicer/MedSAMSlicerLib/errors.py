"""The error every Lib module raises for input a user can fix."""


class InputError(ValueError):
    """Something the user gave (nodes, markups, settings) cannot be used; the message says what to change."""
