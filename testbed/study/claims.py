"""The claims of Eloul et al. (2022)'s abstract, each judged cell by cell with a stated rule.

A cell *leaks* when the lower end of its recovered-fraction interval is above ``LEAK``. It *resists* when
the upper end is below ``LEAK``, or when not one of its samples was recovered over at least
``MIN_UPDATES`` audited updates (the interval of such a cell is the conservative update-level bound, see
``testbed.study.stats.cluster_bootstrap``, printed beside it); otherwise it is undecided. A policy *lowers*
leakage against the baseline when the paired difference is negative with p < ``ALPHA``. Every verdict
lists the cells it rests on, with their intervals and stages. Comparisons hold for the audited models
(units of one seed share a global model), not over training randomness.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.study.tables import Cell

LEAK = 0.05  # a recovered fraction above 5% of the audited samples is a leak
ALPHA = 0.05
MIN_UPDATES = 10


@dataclass
class Claim:
    """One claim, its verdict (supported, refuted, partly, untested) and the cells behind it."""

    text: str
    verdict: str
    rule: str
    evidence: list[str] = field(default_factory=list)


def leaks(cell: Cell) -> bool:
    """The interval lies above LEAK."""
    return cell.recovered.low > LEAK


def resists(cell: Cell) -> bool:
    """The interval lies below LEAK, or nothing was recovered from at least MIN_UPDATES updates."""
    return cell.recovered.high < LEAK or (cell.recovered.value == 0 and len(cell.rows) >= MIN_UPDATES)


def lowers(cell: Cell) -> bool:
    """Significantly less leakage than the baseline on the same models and clients."""
    return (
        cell.versus_baseline is not None
        and cell.versus_baseline.value < 0
        and cell.p_value is not None
        and cell.p_value < ALPHA
    )


def describe(cell: Cell) -> str:
    """'arm, policy, batch B, stage: 0.42 [0.30, 0.55]' (plus the paired difference where there is one)."""
    text = (
        f"{cell.arm}, {cell.policy}, batch {cell.batch_size}, {cell.stage}: "
        f"{cell.recovered.value:.2f} [{cell.recovered.low:.2f}, {cell.recovered.high:.2f}]"
    )
    if cell.versus_baseline is not None and cell.p_value is not None:
        text += f", vs baseline {cell.versus_baseline.value:+.2f} (p={cell.p_value:.3g})"
    return text


def _verdict(good: int, bad: int) -> str:
    if good and not bad:
        return "supported"
    if bad and not good:
        return "refuted"
    if good and bad:
        return "partly"
    return "untested"


def _select(cells: Sequence[Cell], test: Callable[[Cell], bool]) -> list[Cell]:
    return [cell for cell in cells if test(cell)]


def _fedsgd(cell: Cell) -> bool:
    return "fedsgd" in cell.arm.split("/")[-1]


def judge(cells: Sequence[Cell], baseline: str, noise: Sequence[dict[str, Any]]) -> list[Claim]:
    """The five claims with their verdicts; ``noise`` is the metric-noise table (testbed.study.metric_noise)."""
    from testbed.study.metric_noise import tolerance

    claims: list[Claim] = []
    dense = _select(
        cells, lambda c: c.arm.split("/")[0].startswith("mlp") and c.policy == baseline and c.batch_size > 1
    )
    claims.append(
        Claim(
            "Mixing in a dense layer resists inversion (batches of several samples are not recovered)",
            _verdict(sum(map(resists, dense)), sum(map(leaks, dense))),
            f"MLP arms (FedSGD and FedAvg), baseline policy ({baseline}), batch > 1: for the claim if a cell resists, "
            f"against it if it leaks (interval above {LEAK:.0%}); supported / refuted when all counted cells agree",
            [describe(c) for c in dense],
        )
    )
    exposed = {(c.arm, c.stage, c.batch_size) for c in cells if c.policy == baseline and leaks(c)}
    situations: dict[tuple[str, str, int], list[Cell]] = {}
    for cell in cells:
        key = (cell.arm, cell.stage, cell.batch_size)
        if cell.policy.startswith("identical") and key in exposed:
            situations.setdefault(key, []).append(cell)
    best = [min(group, key=lambda c: c.recovered.value) for group in situations.values()]
    claims.append(
        Claim(
            "Identical labels in a batch (with the right loss) maximise mixing and so resist inversion",
            _verdict(sum(resists(c) and lowers(c) for c in best), sum(not (resists(c) and lowers(c)) for c in best)),
            "wherever the baseline leaks, the identical-label policy with the least leakage (over losses and "
            "min_batch): for the claim if it resists and is significantly below the baseline on the same models "
            "and clients (paired, p < 0.05), against it otherwise",
            [describe(c) for c in best],
        )
    )
    demix = _select(
        cells,
        lambda c: c.arm.startswith("softmax") and _fedsgd(c) and c.policy.startswith("distinct") and c.batch_size > 1,
    )
    by_ce = [c for c in demix if c.policy.endswith("-ce") and "ce-demix" in c.by_attack]
    claims.append(
        Claim(
            "Cross-entropy de-mixes distinct-label batches without optimisation (softmax, analytic attack)",
            _verdict(
                sum(c.by_attack["ce-demix"] > 0.5 and leaks(c) for c in by_ce),
                sum(c.by_attack["ce-demix"] <= 0.5 for c in by_ce),
            ),
            "softmax under FedSGD, distinct-labels / cross-entropy, batch > 1: for the claim if ce-demix alone "
            "recovers more than half of the samples, against it otherwise (the mse rows are listed for comparison)",
            [f"{describe(c)}; ce-demix alone {c.by_attack.get('ce-demix', float('nan')):.2f}" for c in demix],
        )
    )
    if noise:
        tolerances = {metric: tolerance(noise, metric) for metric in ("avd", "mse", "ssim")}
        if not any(tolerances.values()):
            verdict = "untested"
        elif tolerances["avd"] > max(tolerances["mse"], tolerances["ssim"]):
            verdict = "supported"
        elif tolerances["avd"] < min(tolerances["mse"], tolerances["ssim"]):
            verdict = "refuted"
        else:
            verdict = "partly"
        claims.append(
            Claim(
                "AVD measures leakage in noisy images better than MSE and SSIM",
                verdict,
                "largest noise sigma at which each metric still scores a noisy copy closer to its original than "
                "every no-information baseline for at least 90% of images (metric_noise.csv): supported if AVD's "
                "is the largest, refuted if it is the smallest",
                [f"{metric}: sigma up to {value:g}" for metric, value in tolerances.items()],
            )
        )
    conv = [
        c for key, group in situations.items() for c in group if key[0].startswith("lenet") or key[0].startswith("cnn")
    ]
    claims.append(
        Claim(
            "The strategies (identical labels, the loss) reduce leakage from LeNet-type convolutional networks",
            _verdict(sum(map(lowers, conv)), sum(not lowers(c) for c in conv)),
            "LeNet and CNN arms, identical-label policies, where the baseline leaks: for the claim if leakage is "
            "significantly below the baseline on the same models and clients (p < 0.05), against it otherwise; "
            "untested where the baseline itself does not leak",
            [describe(c) for c in conv]
            or [
                f"baseline does not leak: {describe(c)}"
                for c in cells
                if (c.arm.startswith("lenet") or c.arm.startswith("cnn")) and c.policy == baseline
            ],
        )
    )
    return claims
