"""Measured levers for the gaps in ``benchmarks/reference_rates.py``: each attack as it is, against variants
patched in this process only (nothing in ``attacks/`` changes), on the victims of the rate table.

- ``ce-demix``: the logit derivatives of cross-entropy in closed form (``(p - y) / N`` and
  ``(diag p - p p^T) / N``) instead of ``C + 1`` autograd passes per evaluation; and a problem's solve
  stopping as soon as one start fits to the exact-fit threshold, instead of when that start has also
  stalled. Against scipy's least_squares per view.
- ``cocktail-party``: fewer Adam steps, and FastICA's orthogonal unmixing (scikit-learn, per view) as the
  start of the regularised refinement instead of a random orthogonal matrix. Against FastICA alone.
- ``inverting-gradients``: the batched path's rate against the number of victims in the batch, against
  breaching's rate per victim measured in the same run.

One thread (torch and BLAS). Run in the reference environment (``bash benchmarks/reference_rates.sh`` once):

    .venv-ref/bin/python -m benchmarks.reference_levers
    .venv-ref/bin/python -m benchmarks.reference_levers --attacks ce-demix cocktail-party
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

import attacks.cocktail_party as cocktail_module
import attacks.logit_solve as logit_module
from attacks import build_attack
from attacks.ce_demix import GOOD_ENOUGH
from attacks.ica import IcaSettings, Separation, initial_unmixing, objective, whiten
from attacks.ica import _optimise as optimise_unmixing
from attacks.losses import ClientLoss
from benchmarks.reference_rates import (
    BreachingInvertingGradients,
    batched,
    fastica_all,
    least_squares_reference,
    lenet_views,
    mean_ssim,
    mlp_cell,
    one_by_one,
)
from defenses import CrossEntropy


@contextmanager
def patched(module: Any, name: str, value: object) -> Iterator[None]:
    """``module.name`` set to ``value`` while the block runs."""
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def report(label: str, seconds: float, count: int, ssim: float, extra: str = "") -> float:
    """Print one measurement (seconds per victim, victims per second, mean SSIM); returns the rate."""
    rate = count / seconds
    print(f"| {label} | {1000 * seconds / count:.1f} | {rate:.3f} | {ssim:.4f} | {extra} |", flush=True)
    return rate


# ce-demix --------------------------------------------------------------------------------------------------------

GENERIC_DERIVATIVES = logit_module.logit_derivatives


def closed_form_derivatives(loss: ClientLoss, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy's ``E`` and ``K_n`` in closed form; any other loss through the testbed's autograd path."""
    if type(loss) is not CrossEntropy:
        return GENERIC_DERIVATIVES(loss, logits, targets)
    count = logits.shape[-2]
    probabilities = torch.softmax(logits, dim=-1)
    error = (probabilities - targets.to(logits.dtype)) / count
    curvature = torch.diag_embed(probabilities) - probabilities.unsqueeze(-1) * probabilities.unsqueeze(-2)
    return error, curvature / count


def levenberg_marquardt_early(
    misfit: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, Tensor]],
    start: Tensor,
    systems: tuple[Tensor, ...],
    iterations: int,
    group: int,
    good_enough: float,
) -> tuple[Tensor, Tensor, int]:
    """``attacks.logit_solve._levenberg_marquardt`` with one change: a problem stops once one of its starts
    has a residual of at most ``good_enough``, whether or not that start has stalled yet."""
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
        converged = better & (cost[rows] - trial_cost <= logit_module.STALL * cost[rows])
        accepted = rows[better]
        points[accepted], values[accepted] = trial[better], trial_values[better]
        jacobian[accepted] = trial_jacobian[better]
        cost[accepted] = trial_cost[better]
        damping[rows] = torch.where(better, damping[rows] / 3, damping[rows] * 4).clamp(1e-12, 1e12)
        active[rows[converged]] = False
        active &= damping < 1e8
        fitted = cost <= good_enough**2 if good_enough > 0 else ~active & (cost <= 0)
        active &= ~fitted.reshape(-1, group).any(dim=1).repeat_interleave(group)
    return points, cost.sqrt(), steps


def ce_demix(views_per_size: int) -> None:
    """ce-demix as it is and with each lever, against least_squares, on batches of 4 and 8."""
    attack = build_attack("ce-demix", {})
    solve = partial(
        least_squares_reference,
        restarts=attack.params["restarts"],
        good_enough=GOOD_ENOUGH * attack.params["fit_tolerance"],
    )
    variants: list[tuple[str, Callable[..., Any], Callable[..., Any]]] = [
        ("as it is", GENERIC_DERIVATIVES, logit_module._levenberg_marquardt),
        ("closed-form cross-entropy derivatives", closed_form_derivatives, logit_module._levenberg_marquardt),
        ("stop a problem at its first exact fit", GENERIC_DERIVATIVES, levenberg_marquardt_early),
        ("both", closed_form_derivatives, levenberg_marquardt_early),
    ]
    print("\n| ce-demix, MLP 784-256-10 sigmoid | ms per view | views/s | mean SSIM | LM steps of the batch |")
    print("|---|---:|---:|---:|---|")
    for size in (4, 8):
        views, originals = mlp_cell(1, size, views_per_size, labels_public=True)
        one_by_one(solve, views[:1])
        attack.reconstruct_many(views[:1])
        start = time.perf_counter()
        found = one_by_one(solve, views)
        seconds = time.perf_counter() - start
        report(f"{len(views)} x {size}: scipy least_squares", seconds, len(views), mean_ssim(originals, found))
        for label, derivatives, solver in variants:
            with (
                patched(logit_module, "logit_derivatives", derivatives),
                patched(logit_module, "_levenberg_marquardt", solver),
            ):
                start = time.perf_counter()
                results = attack.reconstruct_many(views)
                seconds = time.perf_counter() - start
            ssim = mean_ssim(originals, [result.images for result in results])
            steps = f"{results[0].diagnostics['iterations']:.0f}"
            report(f"{len(views)} x {size}: testbed, {label}", seconds, len(views), ssim, steps)


# cocktail-party --------------------------------------------------------------------------------------------------

ORIGINAL_SEPARATE = cocktail_module.separate


def separate_from_fastica(
    mixtures: Tensor, components: int, input_shape: tuple[int, ...], settings: IcaSettings, device: torch.device
) -> Separation:
    """``attacks.ica.separate`` with FastICA's unmixing of each view's white signals as Adam's start."""
    from sklearn.decomposition import FastICA

    image_shape = tuple(input_shape)
    white, rank = whiten(mixtures.to(torch.float64), components, settings.rtol)
    starts = []
    for signals in white:
        ica = FastICA(n_components=components, whiten=False, fun="logcosh", max_iter=200, tol=1e-4, random_state=0)
        ica.fit(signals.T.numpy())
        starts.append(torch.from_numpy(ica.components_))
    unmixing = torch.stack(starts) if components > 1 else initial_unmixing(components, settings.seed)[None]
    steps = torch.zeros(len(mixtures), dtype=torch.long)
    if components > 1 and settings.iterations > 1:  # 1 step asked: FastICA alone
        unmixing, steps = optimise_unmixing(
            unmixing, white.to(device=device, dtype=torch.float32), image_shape, settings
        )
    with torch.no_grad():
        unit = unmixing / unmixing.norm(dim=-1, keepdim=True)
        correlation = (unit @ unit.transpose(-1, -2)).abs() - torch.eye(components, dtype=torch.float64)
        return Separation(
            sources=unit @ white,
            rank=rank,
            objective=objective(unmixing, white, image_shape, settings),
            max_correlation=correlation.flatten(1).amax(dim=-1),
            iterations=steps,
        )


def cocktail_party(batches: int) -> None:
    """cocktail-party as it is, with fewer steps and from FastICA's start, against FastICA, B = 8, 16, 32."""
    variants: list[tuple[str, int, Callable[..., Separation]]] = [
        ("as it is (1,000 steps, early stop)", 1000, ORIGINAL_SEPARATE),
        ("300 steps", 300, ORIGINAL_SEPARATE),
        ("FastICA start, no Adam step", 1, separate_from_fastica),
        ("FastICA start + 100 steps", 100, separate_from_fastica),
        ("FastICA start + 300 steps", 300, separate_from_fastica),
    ]
    print("\n| cocktail-party, MLP 784-256-10 sigmoid | ms per view | views/s | mean SSIM | Adam steps run (mean) |")
    print("|---|---:|---:|---:|---|")
    for size in (8, 16, 32):
        views, originals = mlp_cell(0, size, batches, labels_public=False)
        fastica_all(views[:1], originals[:1], 1000)
        build_attack("cocktail-party", {}).reconstruct_many(views[:1])
        start = time.perf_counter()
        found = fastica_all(views, originals, 1000)
        report(f"{batches} x {size}: FastICA", time.perf_counter() - start, len(views), mean_ssim(originals, found))
        for label, iterations, separate in variants:
            attack = build_attack("cocktail-party", {"iterations": iterations})
            with patched(cocktail_module, "separate", separate):
                start = time.perf_counter()
                results = attack.reconstruct_many(views)
                seconds = time.perf_counter() - start
            ssim = mean_ssim(originals, [result.images for result in results])
            steps = f"{np.mean([result.diagnostics['iterations'] for result in results]):.0f}"
            report(f"{batches} x {size}: testbed, {label}", seconds, len(views), ssim, steps)


# inverting-gradients ---------------------------------------------------------------------------------------------


def inverting_gradients(counts: Sequence[int], iterations: int, reference_victims: int) -> None:
    """The batched path's rate on ``counts`` single-digit victims (DLG init) against breaching's per victim."""
    views, originals = lenet_views("dlg", max(counts), 0)
    attack = build_attack("inverting-gradients", {"iterations": iterations})
    reference = BreachingInvertingGradients(views[0].model, iterations, attack.params["tv_weight"])
    batched(build_attack("inverting-gradients", {"iterations": 2}), views[:2])
    print(
        f"\n| inverting-gradients, LeNet DLG init, single digits, {iterations} iterations | ms per victim "
        "| victims/s | mean SSIM | against breaching |"
    )
    print("|---|---:|---:|---:|---:|")
    start = time.perf_counter()
    found = one_by_one(reference.reconstruct, views[:reference_victims])
    seconds = time.perf_counter() - start
    rate = report(
        f"breaching, first {reference_victims} victims",
        seconds,
        reference_victims,
        mean_ssim(originals[:reference_victims], found),
    )
    for count in counts:
        start = time.perf_counter()
        images = batched(attack, views[:count])
        seconds = time.perf_counter() - start
        ssim = mean_ssim(originals[:count], images)
        mine = count / seconds
        same = mean_ssim(originals[:reference_victims], images[:reference_victims])
        extra = f"{mine / rate:.2f}x (SSIM of its first {reference_victims}: {same:.4f})"
        report(f"testbed batched, {count} victims", seconds, count, ssim, extra)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen levers at one thread."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--attacks",
        nargs="+",
        default=["ce-demix", "cocktail-party", "inverting-gradients"],
        choices=["ce-demix", "cocktail-party", "inverting-gradients"],
    )
    parser.add_argument("--ce-views", type=int, default=16)
    parser.add_argument("--cp-batches", type=int, default=6)
    parser.add_argument("--ig-victims", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--ig-iterations", type=int, default=1000)
    parser.add_argument("--ig-reference-victims", type=int, default=4)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Ignoring n_components")
    torch.set_num_threads(1)
    with threadpool_limits(1):
        if "ce-demix" in args.attacks:
            ce_demix(args.ce_views)
        if "cocktail-party" in args.attacks:
            cocktail_party(args.cp_batches)
        if "inverting-gradients" in args.attacks:
            inverting_gradients(args.ig_victims, args.ig_iterations, args.ig_reference_victims)


if __name__ == "__main__":
    main()
