"""Fault injection: clients that send invalid updates, so validation can be tested end to end."""

from __future__ import annotations

import torch
from torch import Tensor

from testbed.runtime.records import Params

HUGE = 1e6


def corrupt_values(update: Params, faulty: Tensor, kind: str) -> Params:
    """The stacked update with the faulty clients' rows set to NaN, to Inf, or scaled by 1e6 ('norm')."""
    if kind not in ("nan", "inf", "norm") or not bool(faulty.any()):
        return update
    corrupted = {}
    for name, value in update.items():
        rows = faulty.view(-1, *[1] * (value.dim() - 1))
        if kind == "norm":
            bad = value * HUGE
        else:
            bad = torch.full_like(value, torch.nan if kind == "nan" else torch.inf)
        corrupted[name] = torch.where(rows, bad, value)
    return corrupted


def malformed(update: Params, row: int, kind: str) -> Params:
    """One client's update as a broken client would send it: a truncated tensor ('shape') or float64 ('dtype')."""
    single = {name: value[row] for name, value in update.items()}
    if kind == "dtype":
        return {name: value.double() for name, value in single.items()}
    first = next(iter(single))
    return {**single, first: single[first].reshape(-1)[:-1]}
