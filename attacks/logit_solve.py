"""Solving a final dense layer's update for the logits of the samples behind it (Eloul et al. 2022).

For ``z = W h + b`` and a batch-mean loss with logit gradients ``E = dL/dZ`` (N x C), the update holds
``gW = E^T H`` and ``gb = E^T 1``; since ``W h_n = z_n - b``, also ``gW W^T = E^T (Z - 1 b^T)``. ``E`` is
a known function of the logits ``Z`` and the labels for each loss (``attacks.losses.logit_derivatives``), so the
two equation sets (C x C and C) determine ``Z`` when N is at most the rank ``E`` can have. They are
solved by Levenberg-Marquardt in float64 from several seeded starting points at once (and for several
updates at once), with the Jacobian in closed form; the start with the smallest residual wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attacks.losses import ClientLoss, logit_derivatives

Misfit = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, Tensor]]
"""Unknowns (K x ...) and K problems' tensors -> the misfits (K x M) and their Jacobians (K x M x P)."""
SPREADS = (0.1, 1.0, 0.5, 2.0)
"""Standard deviations (in logits) of the perturbations around the starting point, used in turn."""
BOOSTS = (0.0, 4.0)
"""Leads (in logits) given to each sample's own label in the starting points, used in turn."""
CENTRE_PRIOR = 0.01
"""Weight of the pull towards zero logits in the fit of the logits shared by all samples (the centre)."""
STALL = 1e-9
"""A start stops once an accepted step lowers its cost by less than this fraction (the round-off floor)."""
FIRST_WAVE = 4
"""Starting points of the first wave of a solve with an exact-fit criterion; the rest run only for the
problems none of these fits exactly."""


@dataclass(frozen=True)
class LogitProblem:
    """One update's final dense layer: weights ``W`` (C x F), bias ``b`` (C), its update ``gW``, ``gb``
    (gradient convention: a one-step delta divided by ``-lr``) and the samples' targets (N x C); float64.
    """

    weight: Tensor
    bias: Tensor
    weight_gradient: Tensor
    bias_gradient: Tensor
    targets: Tensor


@dataclass(frozen=True)
class LogitSolution:
    """The logits found (N x C), their logit gradients ``E`` (N x C), the relative residual and the work done."""

    logits: Tensor
    error: Tensor
    residual: float
    iterations: int
    restarts: int


def _system(problem: LogitProblem) -> tuple[Tensor, ...]:
    """The tensors the residual reads: ``gW W^T``, ``gb``, ``b``, the targets and the two scales."""
    gram = problem.weight_gradient @ problem.weight.T
    return (
        gram,
        problem.bias_gradient,
        problem.bias,
        problem.targets,
        gram.norm().clamp_min(1e-300),
        problem.bias_gradient.norm().clamp_min(1e-300),
    )


def _equations(loss: ClientLoss) -> Misfit:
    """The misfit of both equation sets at the logits (K x N x C), each scaled by its right-hand side's norm."""

    def misfit(logits: Tensor, system: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        gram, bias_gradient, bias, targets, gram_scale, bias_scale = system
        error, curvature = logit_derivatives(loss, logits, targets)
        shifted = logits - bias[:, None, :]
        count, classes = logits.shape[0], logits.shape[2]
        gram_misfit = (torch.einsum("kni,knj->kij", error, shifted) - gram) / gram_scale[:, None, None]
        bias_misfit = (error.sum(dim=1) - bias_gradient) / bias_scale[:, None]
        eye = torch.eye(classes, dtype=logits.dtype)
        gram_jacobian = torch.einsum("knim,knj->kijnm", curvature, shifted) + torch.einsum("kni,jm->kijnm", error, eye)
        bias_jacobian = curvature.permute(0, 2, 1, 3)
        values = torch.cat([gram_misfit.reshape(count, -1), bias_misfit], dim=1)
        jacobian = torch.cat(
            [
                gram_jacobian.reshape(count, classes * classes, -1) / gram_scale[:, None, None],
                bias_jacobian.reshape(count, classes, -1) / bias_scale[:, None, None],
            ],
            dim=1,
        )
        return values, jacobian

    return misfit


def _shared_equations(loss: ClientLoss) -> Misfit:
    """The bias equation's misfit when every sample has the same logits (K x C), plus a weak pull
    (``CENTRE_PRIOR``) towards zero that keeps saturating losses (mse) from running to infinite logits."""

    def misfit(shared: Tensor, system: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        _, bias_gradient, _, targets, _, bias_scale = system
        classes = shared.shape[1]
        error, curvature = logit_derivatives(loss, shared[:, None, :].expand(targets.shape), targets)
        centring = torch.eye(classes, dtype=shared.dtype) - 1.0 / classes
        values = torch.cat(
            [(error.sum(dim=1) - bias_gradient) / bias_scale[:, None], CENTRE_PRIOR * shared @ centring], dim=1
        )
        jacobian = torch.cat(
            [curvature.sum(dim=1) / bias_scale[:, None, None], (CENTRE_PRIOR * centring).expand(len(shared), -1, -1)],
            dim=1,
        )
        return values, jacobian

    return misfit


def starting_logits(centre: Tensor, targets: Tensor, restarts: int, generator: torch.Generator) -> Tensor:
    """``restarts`` starting points (R x N x C) around ``centre`` (C), the logits shared by all samples
    that best explain the bias update (for cross-entropy, the log of the batch's mean prediction).

    Each start adds per-sample noise (to break the symmetry between samples of one label; its spread
    cycles through ``SPREADS``) and, on every other start, a lead of ``BOOSTS`` logits to each sample's
    own label.
    """
    noise = torch.randn((restarts, *targets.shape), generator=generator, dtype=torch.float64)
    spread = torch.tensor([SPREADS[k % len(SPREADS)] for k in range(restarts)], dtype=torch.float64)
    boost = torch.tensor([BOOSTS[k % len(BOOSTS)] for k in range(restarts)], dtype=torch.float64)
    return centre + spread[:, None, None] * noise + boost[:, None, None] * targets


def _levenberg_marquardt(
    misfit: Misfit, start: Tensor, systems: tuple[Tensor, ...], iterations: int, group: int, good_enough: float
) -> tuple[Tensor, Tensor, int]:
    """Minimise every start's squared misfit at once (``start``: K x ..., one system per start).

    Consecutive runs of ``group`` starts belong to one problem: all of them stop once one has converged
    (an accepted step lowered its cost by less than ``STALL``) to a residual of at most ``good_enough``.
    Returns the points, their residual norms and the number of steps taken.
    """
    points = start.clone()
    values, jacobian = misfit(points, systems)
    cost = (values**2).sum(dim=1)
    damping = torch.full_like(cost, 1e-3)
    active = torch.isfinite(cost)
    steps = 0
    while steps < iterations and bool(active.any()):
        steps += 1
        rows = torch.nonzero(active).flatten()
        jac = jacobian[rows]
        normal = jac.transpose(1, 2) @ jac
        diagonal = torch.diagonal(normal, dim1=1, dim2=2).clamp_min(1e-12)
        lifted = normal + torch.diag_embed(damping[rows, None] * diagonal)
        step = torch.linalg.solve(lifted, jac.transpose(1, 2) @ values[rows, :, None])
        trial = points[rows] - step.reshape(points[rows].shape)
        trial_values, trial_jacobian = misfit(trial, tuple(part[rows] for part in systems))
        trial_cost = (trial_values**2).sum(dim=1)
        better = torch.isfinite(trial_cost) & (trial_cost < cost[rows])
        converged = better & (cost[rows] - trial_cost <= STALL * cost[rows])
        accepted = rows[better]
        points[accepted], values[accepted] = trial[better], trial_values[better]
        jacobian[accepted] = trial_jacobian[better]
        cost[accepted] = trial_cost[better]
        damping[rows] = torch.where(better, damping[rows] / 3, damping[rows] * 4).clamp(1e-12, 1e12)
        active[rows[converged]] = False
        active &= damping < 1e8
        solved = (~active & (cost <= good_enough**2)).reshape(-1, group).any(dim=1)
        active &= ~solved.repeat_interleave(group)
    return points, cost.sqrt(), steps


def wave_sizes(restarts: int) -> list[int]:
    """How many of ``restarts`` starting points each wave of the logit solve runs: ``FIRST_WAVE``, then the rest."""
    first = min(FIRST_WAVE, restarts)
    return [first, restarts - first] if restarts > first else [first]


def solve_logits(
    loss: ClientLoss,
    problems: Sequence[LogitProblem],
    *,
    restarts: int,
    iterations: int,
    seed: int,
    good_enough: float = 0.0,
) -> list[LogitSolution]:
    """For each problem, the logits (N x C) whose logit gradients under ``loss`` best explain its update.

    Every problem must have the same N and C; all problems run as one batch. Each problem's starts are
    drawn from a generator seeded with ``seed``, so a problem's answer does not depend on the others
    solved with it. With ``good_enough`` > 0 the starts run in waves (``wave_sizes``): a problem one of
    whose starts has converged to a relative residual of at most ``good_enough`` (an exact fit) stops,
    and its remaining starts never run; the others run the next wave. With ``good_enough`` = 0 every
    start runs until it converges, in one wave. The start with the smallest residual among those run wins.
    """
    count = len(problems)
    systems = tuple(torch.stack(parts) for parts in zip(*[_system(problem) for problem in problems], strict=True))
    classes = problems[0].targets.shape[1]
    zero = torch.zeros((count, classes), dtype=torch.float64)
    centres, _, _ = _levenberg_marquardt(_shared_equations(loss), zero, systems, iterations, 1, 0.0)
    starts = []
    for problem, centre in zip(problems, centres, strict=True):
        generator = torch.Generator().manual_seed(seed)
        starts.append(starting_logits(centre, problem.targets, restarts, generator))
    every = torch.stack(starts)
    points = every.clone()
    misfit = torch.full((count, restarts), torch.inf, dtype=torch.float64)
    pending = torch.arange(count)
    steps, used, offset = 0, torch.zeros(count, dtype=torch.long), 0
    for size in wave_sizes(restarts) if good_enough > 0 else [restarts]:
        if len(pending) == 0:
            break
        wave = slice(offset, offset + size)
        repeated = tuple(part[pending].repeat_interleave(size, dim=0) for part in systems)
        found, residual, taken = _levenberg_marquardt(
            _equations(loss), every[pending, wave].flatten(0, 1), repeated, iterations, size, good_enough
        )
        points[pending, wave] = found.reshape(len(pending), size, *found.shape[1:])
        misfit[pending, wave] = torch.where(torch.isfinite(residual), residual, torch.inf).reshape(len(pending), size)
        used[pending] += size
        steps += taken
        offset += size
        pending = pending[~(misfit[pending, wave] <= good_enough).any(dim=1)]
    solutions = []
    for index, problem in enumerate(problems):
        best = int(torch.argmin(misfit[index]))
        logits = points[index, best]
        solutions.append(
            LogitSolution(
                logits=logits,
                error=logit_derivatives(loss, logits[None], problem.targets[None])[0][0],
                residual=float(misfit[index, best]),
                iterations=steps,
                restarts=int(used[index]),
            )
        )
    return solutions
