"""The claims of Eloul et al. (2022)'s abstract, each judged cell by cell with a stated rule.

A cell *leaks* when the lower end of its recovered-fraction interval is above ``LEAK`` and *resists*
when the upper end is below it; otherwise it is undecided. A policy *lowers* leakage against the
baseline when the paired difference is negative with p < ``ALPHA``. Every verdict lists the cells it
rests on, with their intervals and stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.study.tables import Cell

LEAK = 0.05  # a recovered fraction above 5% of the audited samples is a leak
ALPHA = 0.05


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
    """The interval lies below LEAK."""
    return cell.recovered.high < LEAK


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


def judge(cells: Sequence[Cell], baseline: str, noise: Sequence[dict[str, Any]]) -> list[Claim]:
    """The five claims with their verdicts; ``noise`` is the metric-noise table (testbed.study.metric_noise)."""
    from testbed.study.metric_noise import tolerance

    claims: list[Claim] = []
    dense = _select(
        cells,
        lambda c: c.arm.startswith("mlp") and c.policy == baseline and c.batch_size > 1,
    )
    claims.append(
        Claim(
            "Mixing in a dense layer resists inversion (batches of several samples are not recovered)",
            _verdict(sum(map(resists, dense)), sum(map(leaks, dense))),
            f"MLP arms, baseline policy ({baseline}), batch > 1: supported if every cell resists, refuted if every "
            f"cell leaks (interval above {LEAK:.0%}), partly if some of each",
            [describe(c) for c in dense],
        )
    )
    exposed = {(c.arm, c.stage, c.batch_size) for c in cells if c.policy == baseline and leaks(c)}
    identical = _select(cells, lambda c: c.policy.startswith("identical") and (c.arm, c.stage, c.batch_size) in exposed)
    claims.append(
        Claim(
            "Identical labels in a batch (with the right loss) maximise mixing and so resist inversion",
            _verdict(sum(map(resists, identical)), sum(not lowers(c) or leaks(c) for c in identical)),
            "identical-label policies wherever the baseline leaks: a cell counts for the claim if it resists, "
            "against it if it still leaks or is not significantly below the baseline (paired, p < 0.05)",
            [describe(c) for c in identical],
        )
    )
    demix = _select(
        cells, lambda c: c.arm.startswith("softmax") and c.policy.startswith("distinct") and c.batch_size > 1
    )
    demix_evidence = [f"{describe(c)}; ce-demix alone {c.by_attack.get('ce-demix', float('nan')):.2f}" for c in demix]
    by_ce = [c for c in demix if c.policy.endswith("-ce")]
    claims.append(
        Claim(
            "Cross-entropy de-mixes distinct-label batches without optimisation (softmax, analytic attack)",
            _verdict(
                sum(c.by_attack.get("ce-demix", 0.0) > 0.5 and leaks(c) for c in by_ce),
                sum(c.by_attack.get("ce-demix", 0.0) <= 0.5 for c in by_ce),
            ),
            "softmax arms, distinct-labels / cross-entropy, batch > 1: for the claim if ce-demix alone recovers "
            "more than half of the samples, against it otherwise (the mse rows are listed for comparison)",
            demix_evidence,
        )
    )
    if noise:
        tolerances = {metric: tolerance(noise, metric) for metric in ("avd", "mse", "ssim")}
        better = tolerances["avd"] > max(tolerances["mse"], tolerances["ssim"])
        worse = tolerances["avd"] < min(tolerances["mse"], tolerances["ssim"])
        claims.append(
            Claim(
                "AVD measures leakage in noisy images better than MSE and SSIM",
                "supported" if better else "refuted" if worse else "partly",
                "largest noise sigma at which each metric still scores a noisy copy closer to its original than "
                "every no-information baseline for at least 90% of images (metric_noise.csv): supported if AVD's "
                "is the largest, refuted if it is the smallest",
                [f"{metric}: sigma up to {value:g}" for metric, value in tolerances.items()],
            )
        )
    conv = _select(
        cells,
        lambda c: (
            (c.arm.startswith("lenet") or c.arm.startswith("cnn"))
            and c.policy.startswith("identical")
            and (c.arm, c.stage, c.batch_size) in exposed
        ),
    )
    claims.append(
        Claim(
            "The strategies (identical labels, the loss) reduce leakage from LeNet-type convolutional networks",
            _verdict(sum(map(lowers, conv)), sum(not lowers(c) for c in conv)),
            "LeNet and CNN arms, identical-label policies, where the baseline leaks: for the claim if leakage is "
            "significantly below the baseline on the same models and clients (p < 0.05), against it otherwise",
            [describe(c) for c in conv],
        )
    )
    return claims
