"""Gradient-inversion attacks on federated-learning updates (pure torch: no Ray, no MLflow, no testbed).

An attack receives an :class:`AttackerView` of one client's update and returns a
:class:`Reconstruction`; ``build_attack(name, params)`` makes one from the registry ``ATTACKS`` (a name, or an
import path ``package.module:Class``); ``register_attack`` adds your own (docs/attacks.md: Write your own attack).
"""

from attacks.base import Attack
from attacks.ce_demix import CrossEntropyDemix
from attacks.cocktail_party import CocktailParty
from attacks.dense_ratio import DenseRatio
from attacks.dlg import DeepLeakage
from attacks.inverting_gradients import InvertingGradients
from attacks.label_inference import LabelInference, infer_labels
from attacks.losses import ClientLoss, batch_loss
from attacks.params import Param
from attacks.registry import ATTACKS, attack_class, attack_name, auto_attacks, build_attack, register_attack
from attacks.view import AttackConfigError, AttackerView, AttackNotApplicable, Reconstruction

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfigError",
    "AttackNotApplicable",
    "AttackerView",
    "ClientLoss",
    "CocktailParty",
    "CrossEntropyDemix",
    "DeepLeakage",
    "DenseRatio",
    "InvertingGradients",
    "LabelInference",
    "Param",
    "Reconstruction",
    "attack_class",
    "attack_name",
    "auto_attacks",
    "batch_loss",
    "build_attack",
    "infer_labels",
    "register_attack",
]
