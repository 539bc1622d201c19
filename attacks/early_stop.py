"""An early stop on an objective plateau, kept per lane (one lane per independent optimisation run).

A lane has *plateaued* when ``patience`` iterations have passed since its best objective last fell by
at least ``min_delta`` relative to the best of that time. The best objective is kept on the device the
objective is computed on and only read back when the rule is checked, so checking every few
iterations costs one small copy, not one synchronisation per step. Objectives are compared in float32
(a relative ``min_delta`` of a percent is far above its resolution).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Plateau:
    """The plateau rule for ``lanes`` independent runs; ``patience = 0`` turns it off.

    ``observe`` takes each step's objective values (NaN counts as +inf); ``check(iteration)`` says which
    lanes have plateaued by then; ``restart`` starts a lane's patience window afresh (a new phase of
    its run, such as a smaller step size, has to beat the best so far by ``min_delta`` in its own
    window).
    """

    def __init__(self, lanes: int, patience: int, min_delta: float, device: torch.device) -> None:
        if patience < 0 or not 0.0 <= min_delta < 1.0 or lanes < 1:
            raise ValueError(f"need lanes >= 1, patience >= 0, 0 <= min_delta < 1: {lanes}, {patience}, {min_delta}")
        self.patience = patience
        self.min_delta = min_delta
        self.best = torch.full((lanes,), math.inf, dtype=torch.float32, device=device)
        self.reference = torch.full((lanes,), math.inf, dtype=torch.float32)
        self.since = torch.zeros(lanes, dtype=torch.long)

    def observe(self, values: Tensor, lanes: Tensor | None = None) -> None:
        """Fold one step's objective values into the best so far (``lanes``: which lanes they belong to)."""
        finite = torch.nan_to_num(values.detach().to(self.best), nan=math.inf)
        if lanes is None:
            torch.minimum(self.best, finite, out=self.best)
        else:
            self.best[lanes] = torch.minimum(self.best[lanes], finite)

    def best_values(self) -> Tensor:
        """The best objective of every lane so far, on the CPU."""
        return self.best.cpu()

    def check(self, iteration: int) -> Tensor:
        """Boolean per lane (CPU): no improvement of ``min_delta`` (relative) in the last ``patience`` iterations.

        A lane whose best fell far enough since its reference point takes the new best as reference
        and ``iteration`` as the start of its window.
        """
        best = self.best.cpu()
        improved = (best < self.reference) & (
            torch.isinf(self.reference) | (self.reference - best >= self.min_delta * self.reference.abs())
        )
        self.reference = torch.where(improved, best, self.reference)
        self.since = torch.where(improved, torch.full_like(self.since, iteration), self.since)
        if self.patience == 0:
            return torch.zeros_like(improved)
        return iteration - self.since >= self.patience

    def restart(self, lanes: Tensor, iteration: int) -> None:
        """Start the window of the lanes in the boolean mask ``lanes`` at ``iteration``, from their best so far."""
        best = self.best.cpu()
        self.reference = torch.where(lanes, best, self.reference)
        self.since = torch.where(lanes, torch.full_like(self.since, iteration), self.since)
