"""Which attacks belong to the paper's era and which came later; a claim gets a verdict per era.

An era's leakage counts only its attacks: "paper" holds the attacks Eloul et al. (2022) could answer,
"to date" every attack of the portfolio. docs/study.md holds the same table with the reasons.
"""

from __future__ import annotations

from collections.abc import Iterable

ERAS: tuple[str, ...] = ("paper", "to date")
"""The eras in order: each holds the attacks of the one before it."""

ATTACK_ERA: dict[str, str] = {
    "dense-ratio": "paper",  # the dense-layer gradient ratio (Phong et al. 2017; the paper's own analysis)
    "dlg": "paper",  # Deep Leakage from Gradients (Zhu et al. 2019)
    "label-inference": "paper",  # iDLG's labels from the sign of the gradient (Zhao et al. 2020)
    "inverting-gradients": "paper",  # Geiping et al. 2020
    "ce-demix": "to date",  # a later logit-space solver of the paper's own de-mixing idea
    "cocktail-party": "to date",  # Kariyappa et al. 2023, independent component analysis of the mixture
}

DEMIXING: frozenset[str] = frozenset({"ce-demix"})
"""Attacks that de-mix a cross-entropy batch gradient the paper's way (no inversion by optimisation)."""


def attacks_of(era: str, portfolio: Iterable[str]) -> list[str]:
    """The attacks of ``portfolio`` that an era counts (an attack not in the table counts as later)."""
    upto = ERAS.index(era)
    return [name for name in portfolio if ERAS.index(ATTACK_ERA.get(name, ERAS[-1])) <= upto]
