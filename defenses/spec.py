"""Turning one part of a YAML ``defence`` block into a constructed part, with path-named errors.

A part may be written as a name (``random``), as ``{name: label-count, k: 2}``, as
``{label-count: {k: 2}}``, or with its main parameter inline: ``{clip-l2: 1.0}``. Parameter names may
use hyphens or underscores.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

from defenses.errors import DefenceConfigError, ParameterError
from defenses.parts import Part
from defenses.registry import Registry

P = TypeVar("P", bound=Part)

_NO_VALUE = object()


@dataclass(frozen=True)
class PartSpec:
    """A parsed part: its name, parameters, optional inline value, and the paths errors should name."""

    name: str
    parameters: dict[str, Any]
    inline: object
    name_field: str
    parameter_field: str


def parse_part(spec: Any, field: str, kind: str) -> PartSpec:
    """Split one part spec into name and parameters, or raise a :class:`DefenceConfigError`."""
    if isinstance(spec, str):
        _check_name(spec, field)
        return PartSpec(spec, {}, _NO_VALUE, field, f"{field}.{spec}")
    if not isinstance(spec, Mapping):
        raise DefenceConfigError(f"{field}: expected a {kind} name or a mapping, got {spec!r}")
    if "name" in spec:
        name = spec["name"]
        _check_name(name, f"{field}.name")
        parameters = {key: value for key, value in spec.items() if key != "name"}
        return PartSpec(name, _parameter_names(parameters, field), _NO_VALUE, f"{field}.name", field)
    if len(spec) != 1:
        keys = ", ".join(repr(key) for key in spec) or "none"
        raise DefenceConfigError(
            f"{field}: a {kind} mapping needs a 'name' key or exactly one key (the {kind} name), "
            f"got keys {keys}"
        )
    ((name, value),) = spec.items()
    _check_name(name, field)
    inner = f"{field}.{name}"
    if value is None:
        return PartSpec(name, {}, _NO_VALUE, field, inner)
    if isinstance(value, Mapping):
        return PartSpec(name, _parameter_names(dict(value), inner), _NO_VALUE, field, inner)
    return PartSpec(name, {}, value, field, inner)


def _check_name(name: object, field: str) -> None:
    """A part name must be a non-empty string."""
    if not isinstance(name, str) or not name.strip():
        raise DefenceConfigError(f"{field}: a part name must be a non-empty string, got {name!r}")


def _parameter_names(parameters: Mapping[Any, Any], field: str) -> dict[str, Any]:
    """Parameters keyed by their Python spelling (hyphens read as underscores)."""
    result: dict[str, Any] = {}
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise DefenceConfigError(f"{field}: parameter names must be strings, got {key!r}")
        result[key.replace("-", "_")] = value
    return result


def build_part(registry: Registry[P], spec: Any, field: str, folder: str | None = None) -> P:
    """Resolve, check and construct the part ``spec`` names; errors name the path under ``field``.

    A part named by import path is looked up in ``folder`` first (``Registry.resolve``).
    """
    parsed = parse_part(spec, field, registry.kind)
    return construct(registry.resolve(parsed.name, parsed.name_field, folder), parsed)


def construct(cls: type[P], parsed: PartSpec) -> P:
    """Check ``parsed``'s parameters against ``cls``'s constructor and build it; errors name the path."""
    parameters = dict(parsed.parameters)
    where = parsed.parameter_field
    if parsed.inline is not _NO_VALUE:
        if cls.main_parameter is None:
            raise DefenceConfigError(
                f"{where}: {parsed.name} takes no inline value; give its parameters as a mapping, "
                f"got {parsed.inline!r}"
            )
        parameters = {cls.main_parameter: parsed.inline}
    accepted, open_ended = _constructor_parameters(cls)
    for key in parameters:
        if key not in accepted and not open_ended:
            allowed = ", ".join(accepted) if accepted else "none"
            raise DefenceConfigError(f"{where}.{key}: unknown parameter of {parsed.name}; allowed: {allowed}")
    for key, parameter in accepted.items():
        if parameter.default is inspect.Parameter.empty and key not in parameters:
            raise DefenceConfigError(f"{where}.{key}: required by {parsed.name}")
    hints = _type_hints(cls)
    values = {key: coerce(value, hints.get(key, Any), f"{where}.{key}") for key, value in parameters.items()}
    try:
        return cls(**values)
    except ParameterError as exc:
        raise DefenceConfigError(f"{where}.{exc.parameter}: {exc.allowed}, got {exc.value!r}") from exc
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise DefenceConfigError(f"{where}: {reason}") from exc


def construct_from_mapping(cls: type[P], spec: Any, field: str) -> P:
    """Build ``cls`` from a bare mapping of its parameters (a block such as ``dp`` that names no part)."""
    if not isinstance(spec, Mapping):
        raise DefenceConfigError(f"{field}: expected a mapping of {cls.name} parameters, got {spec!r}")
    return construct(cls, PartSpec(cls.name, _parameter_names(spec, field), _NO_VALUE, field, field))


def _constructor_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters ``cls`` accepts, and whether it accepts any keyword (``**kwargs``)."""
    signature = inspect.signature(cls)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {name: p for name, p in signature.parameters.items() if p.kind in kinds}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return accepted, open_ended


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the constructor's parameters (empty where they cannot be resolved)."""
    init = next(vars(klass)["__init__"] for klass in cls.__mro__ if "__init__" in vars(klass))
    try:
        return typing.get_type_hints(init)
    except Exception:
        return {}


def coerce(value: Any, annotation: Any, field: str) -> Any:
    """Check ``value`` against a simple annotation (bool, int, float, str, Literal, unions, None)."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, field)
            except DefenceConfigError:
                continue
        raise DefenceConfigError(f"{field}: expected {describe_type(annotation)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if any(type(value) is type(choice) and value == choice for choice in choices):
            return value
        raise DefenceConfigError(f"{field}: expected {describe_type(annotation)}, got {value!r}")
    if annotation is bool and not isinstance(value, bool):
        raise DefenceConfigError(f"{field}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise DefenceConfigError(f"{field}: expected an integer, got {value!r}")
    if annotation is float:
        return _as_float(value, field)
    if annotation is str and not isinstance(value, str):
        raise DefenceConfigError(f"{field}: expected a string, got {value!r}")
    return value


def _as_float(value: Any, field: str) -> float:
    """A number as float; numeric strings such as '1e-3' (which YAML 1.1 leaves as text) are read too."""
    if isinstance(value, bool):
        raise DefenceConfigError(f"{field}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise DefenceConfigError(f"{field}: expected a number, got {value!r}")


def describe_type(annotation: Any) -> str:
    """A reader's description of an annotation, for error messages."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe_type(option) for option in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))
