"""The attacks by name, and building one from a name and a parameter mapping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attacks.base import Attack
from attacks.ce_demix import CrossEntropyDemix
from attacks.cocktail_party import CocktailParty
from attacks.dense_ratio import DenseRatio
from attacks.dlg import DeepLeakage
from attacks.inverting_gradients import InvertingGradients
from attacks.label_inference import LabelInference
from attacks.view import AttackConfigError

ATTACKS: dict[str, type[Attack]] = {
    attack.name: attack
    for attack in (DenseRatio, CrossEntropyDemix, LabelInference, DeepLeakage, InvertingGradients, CocktailParty)
}


def auto_attacks() -> list[str]:
    """The attacks ``attack: auto`` runs, in registry order: every registered attack that recovers images."""
    return [name for name, attack in ATTACKS.items() if attack.in_auto]


def build_attack(name: str, params: Mapping[str, Any] | None = None, device: str = "cpu") -> Attack:
    """The attack registered as ``name`` with ``params`` over its defaults; AttackConfigError otherwise."""
    if name not in ATTACKS:
        raise AttackConfigError(f"attack.name: unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    if params is not None and not isinstance(params, Mapping):
        raise AttackConfigError(f"attack {name!r}: parameters must be a mapping, got {type(params).__name__}")
    return ATTACKS[name](device, **dict(params or {}))
