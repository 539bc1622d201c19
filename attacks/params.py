"""Declared attack parameters: defaults, types and allowed ranges, validated into one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attacks.view import AttackConfigError


@dataclass(frozen=True)
class Param:
    """One attack parameter: its default, its type, and the values it allows."""

    default: Any
    kind: type
    minimum: float | None = None
    strictly_above: bool = False
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""

    def allowed(self) -> str:
        """A short description of the allowed values, for error messages and docs."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        text = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[self.kind]
        if self.minimum is not None:
            text += f" {'>' if self.strictly_above else '>='} {self.minimum:g}"
        if self.maximum is not None:
            text += f"{' and' if self.minimum is not None else ''} <= {self.maximum:g}"
        return text

    def validate(self, where: str, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise AttackConfigError.

        Numbers follow the rule of defence parameters (``defenses.spec.coerce``): a number parameter also
        takes a numeric string such as ``'1e-3'`` (YAML 1.1 loaders keep ``1e-3`` as text); an integer
        parameter takes whole numbers only, never strings or booleans.
        """
        bad = AttackConfigError(f"{where}: must be {self.allowed()}, got {value!r}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
        elif self.kind is float:
            if isinstance(value, str):  # the rule defence parameters follow: '1e-3', which YAML 1.1 keeps as text
                try:
                    value = float(value)
                except ValueError:
                    raise bad from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise bad
            value = float(value)
        elif self.kind is str and not isinstance(value, str):
            raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if self.minimum is not None:
            below = value <= self.minimum if self.strictly_above else value < self.minimum
            if below:
                raise bad
        if self.maximum is not None and value > self.maximum:
            raise bad
        return value


def resolve_params(attack: str, declared: Mapping[str, Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``given`` over the declared defaults; unknown names or bad values raise AttackConfigError."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        allowed = ", ".join(declared) if declared else "none"
        raise AttackConfigError(f"attack {attack!r}: unknown parameter {unknown[0]!r}; allowed: {allowed}")
    resolved = {name: spec.default for name, spec in declared.items()}
    for name, value in given.items():
        resolved[name] = declared[name].validate(f"{attack}.{name}", value)
    return resolved
