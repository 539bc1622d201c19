"""Adam over a stack of lanes (the first dimension): each lane its own step count and step size.

The optimisation attacks optimise many independent problems at once (Inverting Gradients: victims x
restarts; cocktail-party: one unmixing matrix per client); lanes finish at different times, and a lane's
step size may differ from the others'. The update is torch's Adam without weight decay (moments, bias
correction, ``EPS`` added to the corrected root second moment), written out so that each lane keeps its
own step count and step size, a lane can sit out a step, and finished lanes can be dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

BETAS = (0.9, 0.999)
"""Adam's moment decay rates (torch's defaults)."""
EPS = 1e-8
"""Added to the bias-corrected root second moment (torch's default)."""


class LaneAdam:
    """Adam state for a stack of lanes shaped like ``params`` (lanes first)."""

    def __init__(self, params: Tensor) -> None:
        self.first = torch.zeros_like(params)
        self.second = torch.zeros_like(params)
        self.steps = torch.zeros(params.shape[0], dtype=params.dtype, device=params.device)

    def step(
        self,
        params: Tensor,
        gradient: Tensor,
        step_size: Tensor | float,
        lanes: Tensor | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        """Move the lanes ``lanes`` (all when None) of ``params`` in place by one Adam step on ``gradient``
        (their rows only); ``step_size`` is one number or one per lane (all lanes); ``bounds`` clamps the moved
        lanes (a projection, e.g. pixels to [0, 1])."""
        with torch.no_grad():
            index = slice(None) if lanes is None else lanes
            shape = (-1,) + (1,) * (params.dim() - 1)
            steps = self.steps[index] + 1
            self.steps[index] = steps
            first = self.first[index].mul_(BETAS[0]).add_(gradient, alpha=1 - BETAS[0])
            second = self.second[index].mul_(BETAS[1]).addcmul_(gradient, gradient, value=1 - BETAS[1])
            if lanes is not None:
                self.first[index] = first
                self.second[index] = second
            size = step_size[index] if isinstance(step_size, Tensor) else step_size
            scale = (size / (1 - BETAS[0] ** steps)).view(shape)
            root = (1 - BETAS[1] ** steps).sqrt().view(shape)
            moved = params[index] - scale * first / (second.sqrt() / root + EPS)
            params[index] = moved if bounds is None else moved.clamp_(*bounds)

    def keep(self, lanes: Tensor) -> None:
        """Keep the state of ``lanes`` only (a mask or indices), in that order: the others are dropped."""
        self.first = self.first[lanes]
        self.second = self.second[lanes]
        self.steps = self.steps[lanes]
