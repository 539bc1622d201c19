"""The attack interface: parameters checked at construction, applicability checked per view."""

from __future__ import annotations

import abc
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from attacks.params import Param, resolve_params
from attacks.view import AttackConfigError, AttackerView, Reconstruction

COSTS = ("analytic", "optimisation")
"""The values of ``Attack.cost``."""


class Attack(abc.ABC):
    """A gradient-inversion attack: turns one client's update (an AttackerView) into a Reconstruction.

    Subclasses declare ``name`` and ``parameters`` and implement ``check`` and ``_reconstruct``; an attack
    that solves several views at once also overrides ``batch_key`` and the batched kernel
    ``_reconstruct_batch`` (``reconstruct_many`` is the template around them). Attacks never mutate the view's
    model; they work on copies or through functional calls.
    """

    name: ClassVar[str]
    parameters: ClassVar[Mapping[str, Param]] = {}
    cost: ClassVar[str] = "analytic"
    """``analytic`` (a few linear-algebra solves per update) or ``optimisation`` (thousands of simulated training
    steps per update): ``attack: auto`` runs optimisation attacks on at most
    ``attack.audit.optimisation_per_round`` updates of a round."""
    in_auto: ClassVar[bool] = True
    """Whether ``attack: auto`` includes the attack (every image attack does; label inference does not)."""
    reads_factors: ClassVar[bool] = False
    """Whether the attack reads a weight given as a thin SVD (``AttackerView.factors``) through the helpers
    of ``attacks.layers``; other attacks are given every weight multiplied out."""

    def __init__(self, device: str | torch.device = "cpu", **params: Any) -> None:
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise AttackConfigError(f"device: not a torch device: {device!r}") from error
        self.params: dict[str, Any] = resolve_params(self.name, self.parameters, params)

    @abc.abstractmethod
    def check(self, view: AttackerView) -> None:
        """Raise AttackNotApplicable with a one-line reason when this attack cannot run on ``view``."""

    @abc.abstractmethod
    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        """Run the attack on a view that passed ``check``."""

    def reconstruct(self, view: AttackerView) -> Reconstruction:
        """Check the view, run the attack (gradients on, even inside ``torch.no_grad``) and record its seconds."""
        self.check(view)
        start = time.perf_counter()
        with torch.enable_grad():
            result = self._reconstruct(view)
        result.diagnostics["seconds"] = time.perf_counter() - start
        return result

    def batch_key(self, view: AttackerView) -> Hashable | None:
        """What views must share to be reconstructed together by ``_reconstruct_batch`` (shapes, loss, ...).

        None, the default, reconstructs each view on its own; attacks with a batched kernel override it.
        """
        return None

    def _reconstruct_batch(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        """Reconstruct views with one ``batch_key`` (each already checked); the default runs them one by one.

        Attacks that batch override this kernel only: ``reconstruct_many`` does the checking, grouping and
        timing around it.
        """
        return [self._reconstruct(view) for view in views]

    def reconstruct_many(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        """Reconstruct several clients' updates, in order: every view checked first (the first that does not
        qualify raises AttackNotApplicable, as ``reconstruct`` would), then the views grouped by ``batch_key``
        and each group given to ``_reconstruct_batch`` (gradients on); each result's ``seconds`` is its
        group's time shared equally among the group's views."""
        for view in views:
            self.check(view)
        groups: dict[Hashable, list[int]] = {}
        for index, view in enumerate(views):
            key = self.batch_key(view)
            groups.setdefault(("alone", index) if key is None else ("batch", key), []).append(index)
        results: dict[int, Reconstruction] = {}
        for members in groups.values():
            start = time.perf_counter()
            with torch.enable_grad():
                solved = self._reconstruct_batch([views[index] for index in members])
            share = (time.perf_counter() - start) / len(members)
            for index, result in zip(members, solved, strict=True):
                result.diagnostics["seconds"] = share
                results[index] = result
        return [results[index] for index in range(len(views))]
