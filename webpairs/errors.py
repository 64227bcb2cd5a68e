"""Errors the command line prints as one line (no traceback)."""


class UserError(Exception):
    """An error caused by the user's input or environment; the message says what to do."""
