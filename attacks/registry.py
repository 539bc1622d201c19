"""The attacks by name, registering your own, and building one from a name (or an import path) and parameters.

An attack is named in a topology by its registry name (``inverting-gradients``) or by import path
(``mylab.attacks:MyAttack``, a subclass of :class:`attacks.Attack`). An import path is resolved by the one
search rule of ``defenses.import_path`` (the recorded ``attack.path``, the working directory, PYTHONPATH), as
models, data sets and defence parts are; the class it names is then registered under its ``name``, so that
``attack: auto`` and the leakage tables see it as they see the built-in attacks.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from attacks.base import COSTS, Attack
from attacks.ce_demix import CrossEntropyDemix
from attacks.cocktail_party import CocktailParty
from attacks.dense_ratio import DenseRatio
from attacks.dlg import DeepLeakage
from attacks.inverting_gradients import InvertingGradients
from attacks.label_inference import LabelInference
from attacks.view import AttackConfigError

ATTACKS: dict[str, type[Attack]] = {}
"""Every registered attack by its ``name``: the built-in ones, then those registered in this process."""

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
A = TypeVar("A", bound=type[Attack])


def register_attack(cls: A) -> A:
    """Register an :class:`Attack` subclass under its ``name`` (lower-case words joined by '-'); returns ``cls``,
    so it serves as a class decorator. Registering the same class twice is harmless; another class under a
    taken name is a ValueError."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise TypeError(f"an attack must subclass attacks.Attack, got {cls!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise TypeError(f"{cls.__qualname__} is abstract: implement {missing}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{cls.__qualname__}.name must be lower-case words joined by '-', got {name!r}")
    if cls.cost not in COSTS:
        raise ValueError(f"{cls.__qualname__}.cost must be one of {', '.join(COSTS)}, got {cls.cost!r}")
    if ATTACKS.get(name, cls) is not cls:
        raise ValueError(f"attack name {name!r} is already registered to {ATTACKS[name].__qualname__}")
    ATTACKS[name] = cls
    return cls


for _builtin in (DenseRatio, CrossEntropyDemix, LabelInference, DeepLeakage, InvertingGradients, CocktailParty):
    register_attack(_builtin)


def attack_class(name: str, folder: str | None = None) -> type[Attack]:
    """The attack a topology names: a registry name, or an import path ``package.module:Class`` imported from
    ``folder`` (the recorded ``attack.path``), the working directory or PYTHONPATH and registered on the way.

    Raises AttackConfigError with a one-line message starting with ``attack.name``.
    """
    if name in ATTACKS:
        return ATTACKS[name]
    # imported here: ``import attacks`` alone loads nothing of defenses (it is usable without them)
    from defenses.import_path import ImportPathError, is_import_path, load_callable

    if not is_import_path(name):
        raise AttackConfigError(
            f"attack.name: unknown attack {name!r}; allowed: {', '.join(ATTACKS)}, "
            "or an import path package.module:Class"
        )
    try:
        cls = load_callable(name, folder)
    except ImportPathError as exc:
        raise AttackConfigError(f"attack.name: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise AttackConfigError(f"attack.name: {name!r} is not a subclass of attacks.Attack")
    try:
        return register_attack(cls)
    except (TypeError, ValueError) as exc:
        raise AttackConfigError(f"attack.name: {name}: {exc}") from None


def attack_name(name: str, folder: str | None = None) -> str:
    """The registry name of the attack ``name`` stands for (an import path's class is imported and registered)."""
    return attack_class(name, folder).name


def auto_attacks() -> list[str]:
    """The attacks ``attack: auto`` runs, in registry order: every registered attack that declares ``in_auto``
    (the built-in image attacks, and any attack registered in this process)."""
    return [name for name, attack in ATTACKS.items() if attack.in_auto]


def build_attack(
    name: str, params: Mapping[str, Any] | None = None, device: str = "cpu", folder: str | None = None
) -> Attack:
    """The attack ``name`` (a registry name or an import path, see :func:`attack_class`) with ``params`` over its
    defaults; AttackConfigError otherwise."""
    cls = attack_class(name, folder)
    if params is not None and not isinstance(params, Mapping):
        raise AttackConfigError(f"attack {name!r}: parameters must be a mapping, got {type(params).__name__}")
    return cls(device, **dict(params or {}))
