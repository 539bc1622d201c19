"""The one error type the command line turns into a single readable line and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (file, field, value, address): reported in one line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class RunAborted(RuntimeError):
    """The run stopped on purpose (too few updates in a round, a chunk out of retries); the message says why.

    The command line prints it as one line, ``testbed: run stopped: ...``, with exit status 1.
    """
