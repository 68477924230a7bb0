"""Exceptions raised by connectors.

Messages are meant to be shown to users and stored in output rows, so they name
the input and never carry credentials (everything goes through `redact`).
"""


class InputError(Exception):
    """A bad input (missing, too big, empty, unreadable); `str(e)` names the input."""


class SinkError(Exception):
    """A sink could not be opened or written; `str(e)` names the sink, without secrets."""
