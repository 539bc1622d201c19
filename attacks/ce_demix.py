"""De-mixing a batch through the final dense layer's logit gradients (Eloul et al. 2022).

For the final dense layer ``z = W h + b`` with logit gradients ``E = dL/dZ`` (N x C, batch-mean loss),
``gW = E^T H``, so ``H = pinv(E^T) gW`` once ``E`` is known. ``E`` is found by solving the update for the
logits (``attacks.logit_solve``: ``gW W^T = E^T (Z - 1 b^T)`` and ``gb = E^T 1``). On a dense network the
per-sample error signals are then carried back layer by layer (the activation's slope is read from the
recovered activations) and the same solve recovers each layer's input, down to the image.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from math import prod
from typing import ClassVar

import torch
from torch import Tensor

from attacks.base import Attack
from attacks.label_inference import infer_labels, present_classes
from attacks.label_search import candidate_labels
from attacks.layers import DenseLayer, activation_slope, dense_chain, summed_gradient
from attacks.logit_solve import LogitProblem, LogitSolution, solve_logits
from attacks.losses import ClientLoss, centred, logit_derivatives, loss_key, loss_name, marks_presence
from attacks.params import Param
from attacks.view import AttackerView, AttackNotApplicable, Reconstruction

SCREEN_RESTARTS = 4
"""Starting points of the short solve that screens each candidate label multiset."""
SCREEN_ITERATIONS = 50
"""Most Levenberg-Marquardt steps of the screening solve."""
GOOD_ENOUGH = 0.1
"""A full solve stops once a start converges below this fraction of ``fit_tolerance``."""
SEARCH_ROUNDS = 3
"""Fewest rounds the label search may take (each: screen the candidates, fully solve the best); it may take
N + 1, enough for one-label steps to reach any multiset from the counted one."""


def largest_batch(loss: ClientLoss, num_classes: int) -> int:
    """The most samples whose logit gradients can be independent: C - 1 when they sum to zero over the classes
    (softmax losses, ``attacks.losses.centred``), else C."""
    return num_classes - 1 if centred(loss, num_classes) else num_classes


def _float64(view: AttackerView, key: str) -> Tensor:
    return view.global_params[key].detach().cpu().to(torch.float64)


@dataclass(frozen=True)
class _Prepared:
    """What the solve needs from one view: its dense layers, activations, labels and logit problem."""

    layers: list[DenseLayer]
    activations: list[torch.nn.Module]
    labels: Tensor
    problem: LogitProblem


class CrossEntropyDemix(Attack):
    """Recovers every sample of a batch from a dense network's update, through its logit gradients.

    Exact (to the conditioning of ``E``) when N is at most C - 1 (C for sigmoid-bce), for any label
    pattern: samples of one label have different predictions, so ``E`` has rank N.
    """

    name: ClassVar[str] = "ce-demix"
    parameters: ClassVar[dict[str, Param]] = {
        "iterations": Param(200, int, minimum=1, help="most Levenberg-Marquardt steps of the logit solve"),
        "restarts": Param(16, int, minimum=1, help="seeded starting points of the logit solve; the best residual wins"),
        "seed": Param(0, int, minimum=0, help="seed of the starting points"),
        "rtol": Param(1e-9, float, minimum=0.0, help="relative singular-value cut-off of the pseudo-inverse"),
        "fit_tolerance": Param(
            1e-5, float, minimum=0.0, help="relative residual above which inferred labels are searched for better ones"
        ),
        "label_candidates": Param(
            64, int, minimum=0, help="most label multisets a search round screens (0: keep the inferred labels)"
        ),
    }

    def check(self, view: AttackerView) -> None:
        """A loss twice differentiable in the logits, one gradient step, at most C - 1 samples (C when the
        loss's logit gradients do not sum to zero), a dense network reading the image."""
        zero = torch.zeros(1, 1, view.num_classes, dtype=torch.float64)
        try:
            error, curvature = logit_derivatives(view.loss, zero, torch.eye(view.num_classes, dtype=torch.float64)[:1])
            usable = bool(torch.isfinite(error).all() and torch.isfinite(curvature).all())
        except Exception as exc:  # a user loss that cannot be differentiated twice or vectorised
            raise AttackNotApplicable(
                f"{self.name}: cannot differentiate loss {loss_name(view.loss)!r} twice in the logits: {exc}"
            ) from None
        if not usable:
            raise AttackNotApplicable(f"{self.name}: loss {loss_name(view.loss)!r} has no finite logit derivatives")
        if view.kind == "delta" and view.local_steps != 1:
            raise AttackNotApplicable(
                f"{self.name}: needs one gradient step; the delta spans {view.local_steps} local steps "
                "(each step moves W, so the update is no longer E^T H at the global weights)"
            )
        limit = largest_batch(view.loss, view.num_classes)
        if view.num_samples > limit:
            raise AttackNotApplicable(
                f"{self.name}: {view.num_samples} samples exceed the {limit} independent logit gradients "
                f"of {loss_name(view.loss)} over {view.num_classes} classes; the update cannot be de-mixed"
            )
        layers, _ = dense_chain(view.model, self.name)
        if layers[0].module.in_features != prod(view.input_shape):
            raise AttackNotApplicable(f"{self.name}: the first dense layer does not read the flattened image")
        if layers[-1].module.out_features != view.num_classes:
            raise AttackNotApplicable(f"{self.name}: the final dense layer does not produce {view.num_classes} logits")

    def _prepare(self, view: AttackerView, labels: Tensor) -> _Prepared:
        layers, activations = dense_chain(view.model, self.name)
        last = layers[-1]
        problem = LogitProblem(
            weight=_float64(view, last.weight_key),
            bias=_float64(view, last.bias_key),
            weight_gradient=summed_gradient(view, last.weight_key),
            bias_gradient=summed_gradient(view, last.bias_key),
            targets=torch.nn.functional.one_hot(labels, view.num_classes).to(torch.float64),
        )
        return _Prepared(layers, activations, labels, problem)

    def _first_labels(self, view: AttackerView) -> Tensor:
        if view.labels is not None:
            return view.labels.detach().cpu().long()
        return infer_labels(view, self.name)

    def _candidates(
        self, view: AttackerView, current: _Prepared, seen: set[tuple[int, ...]], first: bool
    ) -> list[Tensor]:
        """Label multisets not yet tried (``attacks.label_search.candidate_labels``), holding the classes the
        bias proves present when the loss marks presence."""
        gradient = current.problem.bias_gradient
        proves = marks_presence(view.loss, view.num_classes)
        required = present_classes(gradient, view.num_samples) if proves else []
        limit = self.params["label_candidates"]
        return candidate_labels(current.labels, view.num_classes, required, limit, first, seen)

    def _search(
        self, loss: ClientLoss, views: Sequence[AttackerView], chosen: list[_Prepared], solutions: list[LogitSolution]
    ) -> list[int]:
        """Replace inferred labels whose solve does not fit by better-fitting label multisets.

        Each round screens every view's candidates with a short solve (all in one batch); each view's best
        candidate then gets the full solve and is kept when it fits better. A view leaves the search when
        it fits (``fit_tolerance``), stops improving, or after ``max(SEARCH_ROUNDS, N + 1)`` rounds.
        Returns how many candidates each view screened.
        """
        tried = [0] * len(views)
        seen = [{tuple(item.labels.tolist())} for item in chosen]
        pending = [index for index, view in enumerate(views) if view.labels is None]
        for round_index in range(max(SEARCH_ROUNDS, views[0].num_samples + 1)):
            pending = [index for index in pending if solutions[index].residual > self.params["fit_tolerance"]]
            owners, problems = [], []
            for index in pending:
                for labels in self._candidates(views[index], chosen[index], seen[index], round_index == 0):
                    seen[index].add(tuple(labels.tolist()))
                    owners.append(index)
                    problems.append(self._prepare(views[index], labels))
                    tried[index] += 1
            if not problems:
                break
            screened = solve_logits(
                loss,
                [item.problem for item in problems],
                restarts=min(SCREEN_RESTARTS, self.params["restarts"]),
                iterations=min(SCREEN_ITERATIONS, self.params["iterations"]),
                seed=self.params["seed"],
            )
            best: dict[int, int] = {}
            for position, (owner, solution) in enumerate(zip(owners, screened, strict=True)):
                if owner not in best or solution.residual < screened[best[owner]].residual:
                    best[owner] = position
            finalists = [problems[position] for position in best.values()]
            pending = []
            for owner, item, solution in zip(best, finalists, self._solve_prepared(loss, finalists), strict=True):
                if solution.residual < solutions[owner].residual:
                    chosen[owner], solutions[owner] = item, solution
                    pending.append(owner)
        return tried

    def _solve_prepared(self, loss: ClientLoss, prepared: Sequence[_Prepared]) -> list[LogitSolution]:
        return solve_logits(
            loss,
            [item.problem for item in prepared],
            restarts=self.params["restarts"],
            iterations=self.params["iterations"],
            seed=self.params["seed"],
            good_enough=GOOD_ENOUGH * self.params["fit_tolerance"],
        )

    def _finish(self, view: AttackerView, prepared: _Prepared, solution: LogitSolution, tried: int) -> Reconstruction:
        rtol = self.params["rtol"]
        layers, error = prepared.layers, solution.error
        singular = torch.linalg.svdvals(error)
        condition = float(singular[0] / singular[-1]) if float(singular[-1]) > 0 else float("inf")
        features = torch.linalg.pinv(error.T, rtol=rtol) @ prepared.problem.weight_gradient
        for index in range(len(layers) - 2, -1, -1):
            above = _float64(view, layers[index + 1].weight_key)
            error = activation_slope(prepared.activations[index], features) * (error @ above)
            features = torch.linalg.pinv(error.T, rtol=rtol) @ summed_gradient(view, layers[index].weight_key)
        batch = prepared.labels.shape[0]
        return Reconstruction(
            images=features.to(torch.float32).reshape(batch, *view.input_shape),
            labels=prepared.labels,
            diagnostics={
                "residual": solution.residual,
                "condition": condition,
                "rank": float(torch.linalg.matrix_rank(solution.error, rtol=rtol)),
                "restarts": float(solution.restarts),
                "iterations": float(solution.iterations),
                "label_candidates": float(tried),
                "distinct_labels": float(prepared.labels.unique().numel()),
            },
        )

    def _solve(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        """Views of one loss and sample count, solved as one batch (the label search too)."""
        loss = views[0].loss
        chosen = [self._prepare(view, self._first_labels(view)) for view in views]
        solutions = self._solve_prepared(loss, chosen)
        tried = self._search(loss, views, chosen, solutions)
        return [
            self._finish(view, item, solution, count)
            for view, item, solution, count in zip(views, chosen, solutions, tried, strict=True)
        ]

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        return self._solve([view])[0]

    def batch_key(self, view: AttackerView) -> Hashable:
        """Views that share a loss, a sample count and a class count are solved as one batch."""
        return (loss_key(view.loss), view.num_samples, view.num_classes)

    def _reconstruct_batch(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        return self._solve(views)
