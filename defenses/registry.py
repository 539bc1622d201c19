"""Registries of defence parts by name, and loading of user parts by import path.

A part named by import path (``package.module:Class``, or ``package.module.Class``) is found by the one
search rule of ``defenses.import_path``: the defence block's recorded folder (``defence.path``), the
working directory, then PYTHONPATH.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from defenses.errors import DefenceConfigError
from defenses.import_path import ImportPathError, load_callable
from defenses.parts import Part

P = TypeVar("P", bound=Part)
T = TypeVar("T", bound=type)

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_REGISTRIES: dict[str, Registry[Any]] = {}


def normalise_name(name: str) -> str:
    """The registry spelling of a part name: lower case, underscores read as hyphens."""
    return name.strip().lower().replace("_", "-")


def is_import_path(name: str) -> bool:
    """Whether ``name`` names a class by import path rather than by registry name."""
    return ":" in name or "." in name


def colon_form(name: str) -> str:
    """A part's import path as ``package.module:Class`` (``package.module.Class`` is read that way too)."""
    name = name.strip()
    if ":" in name:
        return name
    module, _, attribute = name.rpartition(".")
    return f"{module}:{attribute}"


class Registry(dict[str, type[P]], Generic[P]):
    """The parts of one kind (batching, loss, transform) by registry name."""

    def __init__(self, kind: str, base: type) -> None:
        super().__init__()
        self.kind = kind
        self.base = base
        _REGISTRIES[kind] = self

    def add(self, cls: type[P]) -> type[P]:
        """Register ``cls`` under its ``name``; returns ``cls`` so it can serve as a decorator."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"a {self.kind} part must subclass {self.base.__name__}, got {cls!r}")
        if inspect.isabstract(cls):
            raise TypeError(f"{cls.__qualname__} is abstract and cannot be registered")
        name = cls.name
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower-case words joined by '-'")
        if self.get(name, cls) is not cls:
            raise ValueError(f"{self.kind} name {name!r} is already registered to {self[name].__qualname__}")
        self[name] = cls
        return cls

    def known(self) -> str:
        """The registered names, sorted and comma-separated, for error messages."""
        return ", ".join(sorted(self))

    def resolve(self, name: str, field: str, folder: str | None = None) -> type[P]:
        """The class a spec names: a registry name, or 'package.module:Class' / 'package.module.Class'
        (imported from ``folder``, the working directory or PYTHONPATH)."""
        if is_import_path(name):
            cls = load_class(name, field, folder)
            if not issubclass(cls, self.base):
                raise DefenceConfigError(f"{field}: {name!r} is not a {self.base.__name__} subclass")
            if inspect.isabstract(cls):
                raise DefenceConfigError(f"{field}: {name!r} is abstract (implement its abstract methods)")
            return cast("type[P]", cls)
        key = normalise_name(name)
        if key not in self:
            raise DefenceConfigError(
                f"{field}: unknown {self.kind} {name!r}; known: {self.known()}, "
                "or an import path 'package.module:ClassName'"
            )
        return self[key]


def load_class(path: str, field: str, folder: str | None = None) -> type:
    """Import the class named by 'package.module:Class[.Inner]' or 'package.module.Class' (see the module
    docstring for where it is looked up); a one-line DefenceConfigError naming ``field`` otherwise."""
    try:
        target = load_callable(colon_form(path), folder)
    except ImportPathError as exc:
        raise DefenceConfigError(f"{field}: {exc}") from None
    if not isinstance(target, type):
        raise DefenceConfigError(f"{field}: {path!r} is not a class")
    return target


def register(kind: str, cls: T) -> T:
    """Register a part class under its ``name`` for ``kind`` ('batching', 'loss' or 'transform')."""
    if kind not in _REGISTRIES:
        raise ValueError(f"unknown part kind {kind!r}; known: {', '.join(sorted(_REGISTRIES))}")
    _REGISTRIES[kind].add(cls)
    return cls


def registered(kind: str) -> Callable[[T], T]:
    """Class decorator form of :func:`register`."""

    def decorate(cls: T) -> T:
        return register(kind, cls)

    return decorate
