"""Label multisets that explain the final dense layer's update, searched when counting labels fails.

Counting labels from the bias gradient (``attacks.label_inference``) is exact for one cross-entropy sample
and usually right for small batches, but it can miss: a class the other samples predict strongly, a loss
whose off-class entries are not all positive (label smoothing, mse). An optimisation attack started with
wrong labels cannot recover the images, so an unlucky count would end the attack. The final dense layer
``z = W h + b`` of any network gives ``gW W^T = E^T (Z - 1 b^T)`` and ``gb = E^T 1``, with ``E`` the logit
gradients of the samples' (logits, labels) under the client's loss (``attacks.logit_solve``): right labels
fit these equations to round-off, wrong ones leave a residual. The search screens label multisets by that
residual, the same rules as ce-demix's search: first every multiset holding the classes the bias proves
present (when there are few enough), then those one label away from the best so far.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.label_inference import infer_labels, label_multisets, label_neighbours, present_classes
from attacks.layers import final_dense, summed_gradient
from attacks.logit_solve import LogitProblem, solve_logits
from attacks.losses import centred, marks_presence
from attacks.view import AttackerView

SEARCH_MAX_SAMPLES = 8
"""Batches up to this size have their counted labels checked and, when they do not fit, searched."""
FIT_TOLERANCE = 1e-5
"""Relative residual of the logit equations below which labels fit (wrong labels leave about 1e-2)."""
CANDIDATES = 64
"""Most label multisets screened per round."""
SCREEN_RESTARTS = 4
SCREEN_ITERATIONS = 50


def candidate_labels(
    labels: Tensor, num_classes: int, required: list[int], limit: int, first: bool, seen: set[tuple[int, ...]]
) -> list[Tensor]:
    """Label multisets not yet tried: every one holding the ``required`` classes when at most ``limit`` (the
    ``first`` round), else those one label away from ``labels``; at most ``limit``."""
    options = label_multisets(labels.shape[0], num_classes, required, limit) if first else None
    if options is None:
        options = label_neighbours(labels, num_classes, required)
    return [option for option in options if tuple(option.tolist()) not in seen][:limit]


def searchable(view: AttackerView) -> bool:
    """Whether the logit equations hold for the view: a gradient or one-step delta of a small enough batch
    (at most ``SEARCH_MAX_SAMPLES``, and no more samples than the loss's independent logit gradients)."""
    one_step = view.kind == "gradient" or view.local_steps == 1
    limit = view.num_classes - 1 if centred(view.loss, view.num_classes) else view.num_classes
    return one_step and view.num_samples <= min(SEARCH_MAX_SAMPLES, limit)


def searched_labels(view: AttackerView, attack: str, seed: int = 0) -> tuple[Tensor, float]:
    """The labels behind the update: the counted ones when they fit the final layer's update, else the best
    fitting multiset found; with the relative residual of the labels returned (NaN when not searchable)."""
    counted = infer_labels(view, attack)
    if not searchable(view):
        return counted, float("nan")
    layer = final_dense(view.model, view.num_classes, attack)

    def problem(labels: Tensor) -> LogitProblem:
        return LogitProblem(
            weight=view.global_params[layer.weight_key].detach().cpu().to(torch.float64),
            bias=view.global_params[layer.bias_key].detach().cpu().to(torch.float64),
            weight_gradient=summed_gradient(view, layer.weight_key),
            bias_gradient=summed_gradient(view, layer.bias_key),
            targets=torch.nn.functional.one_hot(labels, view.num_classes).to(torch.float64),
        )

    def residuals(options: list[Tensor]) -> list[float]:
        solutions = solve_logits(
            view.loss,
            [problem(option) for option in options],
            restarts=SCREEN_RESTARTS,
            iterations=SCREEN_ITERATIONS,
            seed=seed,
        )
        return [solution.residual for solution in solutions]

    best, fit = counted, residuals([counted])[0]
    gradient = summed_gradient(view, layer.bias_key)
    required = present_classes(gradient, view.num_samples) if marks_presence(view.loss, view.num_classes) else []
    seen = {tuple(counted.tolist())}
    for round_index in range(max(3, view.num_samples + 1)):
        if fit <= FIT_TOLERANCE:
            break
        options = candidate_labels(best, view.num_classes, required, CANDIDATES, round_index == 0, seen)
        if not options:
            break
        seen.update(tuple(option.tolist()) for option in options)
        scores = residuals(options)
        winner = min(range(len(options)), key=scores.__getitem__)
        if scores[winner] >= fit:
            break
        best, fit = options[winner], scores[winner]
    return best, fit
