"""The six claims of Eloul et al. (2022)'s abstract, each judged per attack era and leakage level.

Three verdicts. A comparison *supports* a claim when its Holm-adjusted p-value (Holm 1979, over the
claim's comparisons in that era and level) is below ``alpha`` in the claimed direction; it *refutes* it
when its interval excludes the meaningful effect the claim needs (``ClaimRules``); otherwise it is
*inconclusive*: the interval holds both no effect and a meaningful one. A claim is refuted when one of
its comparisons refutes it, supported when all support it, inconclusive otherwise. Which cells a claim
covers is read from the study's metadata (model family, algorithm, the policy's batching, loss and DP),
never from names. Verdicts hold for the audited models at the study's budgets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.study.eras import DEMIXING, ERAS, attacks_of
from testbed.study.metric_noise import tolerance
from testbed.study.spec import ClaimRules, StudySpec
from testbed.study.stats import holm, seed_interval, seeds_for_significance, versus_level
from testbed.study.tables import LEVELS, STRICT, Cell

SUPPORTED, REFUTED, INCONCLUSIVE, UNTESTED = "supported", "refuted", "inconclusive", "not tested"
DENSE_MODELS = frozenset({"softmax", "mlp"})
CONV_MODELS = frozenset({"lenet", "cnn"})

CLAIMS: dict[str, str] = {
    "dense": "We show that overlapping gradients provides numerical resistance to gradient inversion on the highly "
    "vulnerable dense layer.",
    "identical": "Specifically, we propose to leverage batching to maximise mixing of gradients by choosing an "
    "appropriate loss function and drawing identical labels.",
    "demix": "We show that otherwise it is possible to directly recover all vectors in a mini-batch without any "
    "numerical optimisation due to the de-mixing nature of the cross entropy loss.",
    "avd": "In contrast to standard metrics, e.g. Mean Squared Error or Structural Similarity Index, AVD offers a "
    "continuous metric for extracting information in noisy images.",
    "performance": "Finally, our empirical results on information recovery from various inversion attacks and "
    "training performance supports our defense strategies.",
    "lenet": "These strategies are also shown to be useful for deep convolutional neural networks such as LeNET "
    "for image recognition.",
}
"""The six claims of the abstract of Eloul et al. 2022 (arXiv 2204.12495), quoted in its order."""


@dataclass(frozen=True)
class Outcome:
    """One comparison behind a verdict: what it is, its numbers, its verdict after Holm."""

    text: str
    verdict: str


@dataclass
class Verdict:
    """A claim's verdict in one era at one leakage level, with the rule and every comparison behind it."""

    claim: str
    era: str
    level: str
    primary: bool
    verdict: str
    rule: str
    outcomes: list[Outcome] = field(default_factory=list)
    seeds_needed: int | None = None

    @property
    def counts(self) -> dict[str, int]:
        """How many comparisons support, refute or leave the claim open."""
        return {v: sum(o.verdict == v for o in self.outcomes) for v in (SUPPORTED, REFUTED, INCONCLUSIVE)}

    def row(self) -> dict[str, Any]:
        """A row of claims.csv (every comparison, in full)."""
        counts = self.counts
        return {
            "claim": self.claim,
            "text": CLAIMS[self.claim],
            "era": self.era,
            "level": self.level,
            "primary": int(self.primary),
            "verdict": self.verdict,
            "comparisons": len(self.outcomes),
            "supporting": counts[SUPPORTED],
            "refuting": counts[REFUTED],
            "inconclusive": counts[INCONCLUSIVE],
            "seeds_for_significance": self.seeds_needed if self.seeds_needed is not None else "",
            "rule": self.rule,
            "evidence": " | ".join(f"{o.text}: {o.verdict}" for o in self.outcomes),
        }


def combine(outcomes: Sequence[Outcome]) -> str:
    """Refuted if one comparison refutes, supported if all support, inconclusive otherwise."""
    if not outcomes:
        return UNTESTED
    if any(o.verdict == REFUTED for o in outcomes):
        return REFUTED
    if all(o.verdict == SUPPORTED for o in outcomes):
        return SUPPORTED
    return INCONCLUSIVE


class Study:
    """The metadata the rules read: per arm its model family and algorithm, per policy its batching."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.rules: ClaimRules = spec.claims
        self.arms = {arm.label: arm for arm in spec.arms}

    def model(self, cell: Cell) -> str:
        """The arm's model family (the model block's name)."""
        return str(self.arms[cell.arm].model.get("name"))

    def algorithm(self, cell: Cell) -> str:
        """The arm's algorithm (fedsgd, fedavg)."""
        return str(self.spec.settings[self.arms[cell.arm].setting].algorithm.get("name"))

    def batching(self, policy: str) -> str:
        """The policy's batching kind: random, identical-labels or distinct-labels."""
        batching = self.spec.policies[policy].get("batching", "random")
        return str(next(iter(batching)) if isinstance(batching, dict) else batching)

    def dp(self, policy: str) -> bool:
        """Whether the policy adds DP-SGD."""
        return self.spec.policies[policy].get("dp") is not None

    def loss(self, policy: str) -> str:
        """The policy's loss."""
        return self.spec.loss_of(policy)

    def portfolio(self, cell: Cell) -> list[str]:
        """The arm's attacks (``auto`` expanded)."""
        return self.arms[cell.arm].attack_names


def describe(cell: Cell, era: str, level: str) -> str:
    """'arm, policy, batch B, stage: 0.42 [0.30, 0.55]' at (era, level), with the paired difference."""
    interval = cell.intervals.get((era, level))
    text = f"{cell.arm}, {cell.policy}, batch {cell.batch_size}, {cell.stage}: "
    text += f"{interval.value:.2f} [{interval.low:.2f}, {interval.high:.2f}]" if interval else "-"
    versus = cell.versus.get((era, level))
    if versus is not None:
        text += f", vs baseline {versus.value:+.2f} [{versus.low:+.2f}, {versus.high:+.2f}] p={versus.p_value:.3g}"
    return text


def _fraction_outcomes(items: Sequence[tuple[str, list[float]]], rules: ClaimRules, claimed_low: bool) -> list[Outcome]:
    """Each (description, seed fractions) against the meaningful effect: the claim says the fraction is
    below it (``claimed_low``) or above it. Supported where the Holm-adjusted seed-level test says so;
    refuted where the interval lies wholly on the other side; inconclusive otherwise."""
    adjusted = holm([versus_level(values, rules.meaningful_effect) for _, values in items])
    outcomes = []
    for (text, values), p in zip(items, adjusted, strict=True):
        interval = seed_interval(values, rules.alpha)
        below = interval.value < rules.meaningful_effect
        against = interval.low > rules.meaningful_effect if claimed_low else interval.high < rules.meaningful_effect
        if p < rules.alpha and below == claimed_low:
            verdict = SUPPORTED
        elif against:
            verdict = REFUTED
        else:
            verdict = INCONCLUSIVE
        outcomes.append(Outcome(f"{text} (Holm p vs {rules.meaningful_effect:g}: {p:.3g})", verdict))
    return outcomes


def _level_outcomes(cells: Sequence[Cell], era: str, level: str, rules: ClaimRules, claimed_low: bool) -> list[Outcome]:
    """Each cell's leaked fraction at (era, level) against the meaningful effect (``_fraction_outcomes``)."""
    items = [
        (describe(cell, era, level), list(cell.fractions[(era, level)].values()))
        for cell in cells
        if (era, level) in cell.fractions
    ]
    return _fraction_outcomes(items, rules, claimed_low)


def _reduction_outcomes(cells: Sequence[Cell], era: str, level: str, rules: ClaimRules) -> list[Outcome]:
    """Each cell's paired difference against the baseline: the claim says it is a reduction. Supported
    when the Holm-adjusted sign-flip p is below alpha with a negative difference; refuted when the
    interval excludes a reduction of the meaningful effect."""
    chosen = [cell for cell in cells if (era, level) in cell.versus]
    adjusted = holm([cell.versus[(era, level)].p_value for cell in chosen])
    outcomes = []
    for cell, p in zip(chosen, adjusted, strict=True):
        versus = cell.versus[(era, level)]
        if p < rules.alpha and versus.value < 0:
            verdict = SUPPORTED
        elif versus.low > -rules.meaningful_effect:
            verdict = REFUTED
        else:
            verdict = INCONCLUSIVE
        detectable = cell.detectable.get((era, level), math.inf)
        shown = f"{detectable:.2f}" if math.isfinite(detectable) else "none at these seeds"
        outcomes.append(
            Outcome(f"{describe(cell, era, level)} (Holm p {p:.3g}, detectable difference {shown})", verdict)
        )
    return outcomes


def _seeds_needed(comparisons: int, rules: ClaimRules) -> int:
    return seeds_for_significance(comparisons, rules.alpha)


def judge(cells: Sequence[Cell], spec: StudySpec, noise: Sequence[dict[str, Any]]) -> list[Verdict]:
    """Every claim's verdict per era and level (the strict level is each claim's primary one)."""
    study = Study(spec)
    rules = study.rules
    baseline = spec.baseline
    verdicts: list[Verdict] = []

    def each(claim: str, levels: Sequence[str], rule: str, judge_one: Callable[[str, str], list[Outcome]]) -> None:
        for era in ERAS:
            for level in levels:
                if level != STRICT and era != ERAS[-1]:
                    continue
                outcomes = judge_one(era, level)
                verdicts.append(
                    Verdict(
                        claim,
                        era,
                        level,
                        level == STRICT,
                        combine(outcomes),
                        rule,
                        outcomes,
                        _seeds_needed(len(outcomes), rules) if outcomes else None,
                    )
                )

    effect = f"{rules.meaningful_effect:g}"
    dense = [c for c in cells if study.model(c) in DENSE_MODELS and c.policy == baseline and c.batch_size > 1]
    each(
        "dense",
        LEVELS,
        f"softmax and MLP arms (FedSGD and FedAvg), the baseline policy, batch > 1: per cell the leaked fraction "
        f"against {effect} (seed-level Clopper-Pearson test, Holm over the cells): supported where it is "
        f"significantly below {effect}, refuted where its interval lies above",
        lambda era, level: _level_outcomes(dense, era, level, rules, claimed_low=True),
    )

    def exposed(era: str, level: str) -> list[Cell]:
        """Identical-label cells (no DP) where the baseline of the same arm, stage and batch leaks."""
        leaking = {
            (c.arm, c.stage, c.batch_size)
            for c in cells
            if c.policy == baseline
            and (era, level) in c.intervals
            and c.intervals[(era, level)].low > rules.meaningful_effect
        }
        return [
            c
            for c in cells
            if study.batching(c.policy) == "identical-labels"
            and not study.dp(c.policy)
            and (c.arm, c.stage, c.batch_size) in leaking
        ]

    def identical(era: str, level: str) -> list[Outcome]:
        """Per situation (arm, stage, batch) where the baseline leaks: supported if one of its identical-label
        policies (the appropriate loss) is supported, refuted if all are refuted, inconclusive otherwise."""
        chosen = [c for c in exposed(era, level) if (era, level) in c.versus]
        resist = _level_outcomes(chosen, era, level, rules, claimed_low=True)
        lower = _reduction_outcomes(chosen, era, level, rules)
        situations: dict[tuple[str, str, int], list[Outcome]] = {}
        for cell, a, b in zip(chosen, resist, lower, strict=True):
            both = (
                SUPPORTED
                if a.verdict == b.verdict == SUPPORTED
                else REFUTED
                if REFUTED in (a.verdict, b.verdict)
                else INCONCLUSIVE
            )
            situations.setdefault((cell.arm, cell.stage, cell.batch_size), []).append(Outcome(a.text, both))
        outcomes = []
        for (arm, stage, size), policies in situations.items():
            verdicts = {o.verdict for o in policies}
            verdict = SUPPORTED if SUPPORTED in verdicts else REFUTED if verdicts == {REFUTED} else INCONCLUSIVE
            listed = "; ".join(f"{o.text} -> {o.verdict}" for o in policies)
            outcomes.append(Outcome(f"{arm}, batch {size}, {stage}: {listed}", verdict))
        return outcomes

    each(
        "identical",
        LEVELS,
        f"wherever the baseline leaks (its interval above {effect}), each identical-label policy without DP (the "
        f"situation counts for the claim if one policy, the appropriate loss, does): supported if its leaked "
        f"fraction is significantly below {effect} and significantly below the "
        f"baseline's (paired over seeds, exact sign flip, Holm); refuted if its interval lies above {effect} or "
        f"its difference's interval excludes a reduction of {effect}",
        identical,
    )

    def demix(era: str, level: str) -> list[Outcome]:
        del level
        items = []
        for cell in cells:
            if not (
                study.algorithm(cell) == "fedsgd"
                and study.loss(cell.policy) == "cross-entropy"
                and study.batching(cell.policy) != "identical-labels"
                and not study.dp(cell.policy)
                and cell.batch_size > 1
            ):
                continue
            for attack in attacks_of(era, study.portfolio(cell)):
                if attack in DEMIXING and attack in cell.attack_fractions:
                    values = list(cell.attack_fractions[attack].values())
                    interval = seed_interval(values, rules.alpha)
                    items.append(
                        (
                            f"{cell.arm}, {cell.policy}, batch {cell.batch_size}, {cell.stage}: {attack} alone "
                            f"{interval.value:.2f} [{interval.low:.2f}, {interval.high:.2f}]",
                            values,
                        )
                    )
        return _fraction_outcomes(items, rules, claimed_low=False)

    each(
        "demix",
        (STRICT,),
        f"FedSGD arms whose portfolio holds an attack that de-mixes cross-entropy without inversion by "
        f"optimisation ({', '.join(sorted(DEMIXING))}), random or distinct labels with cross-entropy, batch > 1: "
        f"that attack's recovered fraction alone against {effect}: supported where significantly above, refuted "
        "where its interval lies below; not tested in an era without such an attack",
        demix,
    )

    if noise:
        tolerances = {metric: tolerance(noise, metric) for metric in ("avd", "mse", "ssim")}
        others = max(tolerances["mse"], tolerances["ssim"])
        if tolerances["avd"] > others:
            verdict = SUPPORTED
        elif tolerances["avd"] < min(tolerances["mse"], tolerances["ssim"]):
            verdict = REFUTED
        else:
            verdict = INCONCLUSIVE
        text = ", ".join(f"{metric} up to sigma {value:g}" for metric, value in tolerances.items())
        for era in ERAS:
            verdicts.append(
                Verdict(
                    "avd",
                    era,
                    STRICT,
                    True,
                    verdict,
                    "the largest noise sigma at which each metric still scores a noisy copy closer to its original "
                    "than every no-information baseline for 90% of images (metric_noise.csv): supported if AVD's is "
                    "the largest, refuted if it is the smallest (one set of images, no seeds: no interval)",
                    [Outcome(text, verdict)],
                )
            )

    costs = [
        c
        for c in cells
        if c.cost is not None and study.batching(c.policy) == "identical-labels" and not study.dp(c.policy)
    ]
    seen: set[tuple[str, str]] = set()
    per_arm: dict[str, list[Outcome]] = {}
    for cell in costs:
        if (cell.arm, cell.policy) in seen or cell.cost is None:
            continue
        seen.add((cell.arm, cell.policy))
        cost = cell.cost
        if cost.low > -rules.accuracy_margin:
            verdict = SUPPORTED
        elif cost.high < -rules.accuracy_margin:
            verdict = REFUTED
        else:
            verdict = INCONCLUSIVE
        per_arm.setdefault(cell.arm, []).append(
            Outcome(
                f"{cell.policy} {cost.value:+.3f} [{cost.low:+.3f}, {cost.high:+.3f}] "
                f"(paired t over {cost.seeds} seeds, p={cost.p_value:.3g})",
                verdict,
            )
        )
    accuracy = []
    for arm, policies in per_arm.items():  # the arm counts for the claim if one policy (the right loss) does
        kinds = {o.verdict for o in policies}
        verdict = SUPPORTED if SUPPORTED in kinds else REFUTED if kinds == {REFUTED} else INCONCLUSIVE
        listed = "; ".join(f"{o.text} -> {o.verdict}" for o in policies)
        accuracy.append(Outcome(f"{arm}, accuracy cost: {listed}", verdict))
    for recovery_verdict in [v for v in verdicts if v.claim == "identical"]:
        recovery = Outcome(f"information recovery: claim 2 is {recovery_verdict.verdict}", recovery_verdict.verdict)
        outcomes = [recovery, *accuracy]
        verdicts.append(
            Verdict(
                "performance",
                recovery_verdict.era,
                recovery_verdict.level,
                recovery_verdict.primary,
                combine(outcomes),
                f"claim 2's verdict (information recovery) and, per arm, the identical-label policies' final "
                f"accuracy against the baseline's, paired by seed (Student t; an arm counts for the claim if one "
                f"policy does): supported where the interval lies "
                f"above -{rules.accuracy_margin:g} (non-inferior), refuted where it lies below",
                outcomes,
                recovery_verdict.seeds_needed,
            )
        )

    def conv(era: str, level: str) -> list[Cell]:
        """LeNet and CNN identical-label cells (no DP) where the baseline leaks: elsewhere there is nothing to
        defend, and no difference can say whether the defence is useful."""
        return [c for c in exposed(era, level) if study.model(c) in CONV_MODELS]

    each(
        "lenet",
        LEVELS,
        f"LeNet and CNN arms, wherever the baseline leaks (its interval above {effect}), every identical-label "
        f"policy without DP: paired difference against the baseline over seeds (exact sign flip, Holm over the "
        f"cells): supported where significantly negative, refuted where its interval excludes a reduction of "
        f"{effect}; cells where the baseline does not leak are not counted (nothing to defend)",
        lambda era, level: _reduction_outcomes(conv(era, level), era, level, rules),
    )
    order = list(CLAIMS)
    return sorted(verdicts, key=lambda v: (order.index(v.claim), ERAS.index(v.era), LEVELS.index(v.level)))
