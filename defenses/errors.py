"""The errors a defence specification can raise."""

from __future__ import annotations


class DefenceConfigError(ValueError):
    """One line naming the field path (e.g. 'defence.update[1].clip-l2.norm') and what is allowed."""


class ParameterError(ValueError):
    """Raised by a part's constructor when one parameter value is outside what the part allows.

    ``build_policy`` turns it into a :class:`DefenceConfigError` whose path ends in ``parameter``.
    User-written parts may raise it too.
    """

    def __init__(self, parameter: str, allowed: str, value: object) -> None:
        super().__init__(f"{parameter}: {allowed}, got {value!r}")
        self.parameter = parameter
        self.allowed = allowed
        self.value = value
