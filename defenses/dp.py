"""DP-SGD for a client group: Poisson-sampled batches, per-example clipping, Gaussian noise, an accountant.

One DP-SGD step of a client holding ``n`` examples (Abadi et al. 2016):

1. every example joins the batch independently with probability ``q = min(1, batch_size / n)``
   (Poisson sampling; the batch size varies, its expectation is ``q n = min(batch_size, n)``);
2. each sampled example's gradient ``g_i`` (over all parameters together) is scaled to
   ``g_i min(1, C / ||g_i||)``, so its L2 norm is at most ``C = clip``;
3. the clipped gradients are summed and ``N(0, (sigma C)^2)`` noise is added to every coordinate,
   ``sigma = noise_multiplier``;
4. the sum is divided by the expected batch size ``q n`` (not by the sampled count, which is not private).

The privacy loss of ``T`` such steps at sample rate ``q`` is computed by Opacus's accountants
(``rdp``: Rényi DP, Mironov 2017, with the subsampled-Gaussian bound of Mironov, Talwar and Zhang 2019;
``prv``: privacy loss random variables, Gopi, Lee and Wutschitz 2021). Opacus is imported only when an
epsilon is asked for.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from defenses.errors import ParameterError
from defenses.parts import Part
from defenses.spec import construct_from_mapping

ACCOUNTANTS = ("rdp", "prv")


def sample_rate(samples: int, batch_size: int) -> float:
    """The Poisson sampling rate of a client with ``samples`` examples: ``min(1, batch_size / samples)``."""
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    return min(1.0, batch_size / samples)


def expected_batch_size(samples: int, batch_size: int) -> float:
    """The expected size of a Poisson batch, ``q n = min(batch_size, samples)``: the DP-SGD normaliser."""
    return sample_rate(samples, batch_size) * samples


def poisson_sample(samples: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Positions (int64, increasing) of the examples that join one batch, each independently with ``rate``."""
    return np.flatnonzero(rng.random(samples) < rate).astype(np.int64)


def epsilon(noise_multiplier: float, rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps, from Opacus's accountant.

    ``accountant`` is ``rdp`` (``opacus.accountants.RDPAccountant``) or ``prv``
    (``opacus.accountants.PRVAccountant``, which returns its upper bound on epsilon). No steps cost nothing.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    ledger: Any = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    ledger.history = [(noise_multiplier, rate, steps)]  # as many step() calls with these arguments
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # log(0) in the PRV grid when q = 1
        return float(ledger.get_epsilon(delta=delta))


def example_norms(per_example: Mapping[str, Tensor]) -> Tensor:
    """Global L2 norm of every example's gradient over all tensors: (C, W) from tensors shaped (C, W, ...)."""
    norms = [
        torch.linalg.vector_norm(value.flatten(2) if value.dtype.itemsize >= 4 else value.float().flatten(2), dim=2)
        for value in per_example.values()
    ]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


@dataclass(frozen=True)
class DPSGD(Part):
    """A group's DP-SGD settings: clip norm, noise multiplier, target delta and accountant."""

    name: ClassVar[str] = "dp"

    clip: float
    noise_multiplier: float
    delta: float
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self) -> None:
        if not self.clip > 0 or math.isinf(self.clip):
            raise ParameterError("clip", "a positive finite number", self.clip)
        if not self.noise_multiplier > 0 or math.isinf(self.noise_multiplier):
            raise ParameterError("noise_multiplier", "a positive finite number", self.noise_multiplier)
        if not 0 < self.delta < 1:
            raise ParameterError("delta", "a number in (0, 1)", self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise ParameterError("accountant", "one of " + ", ".join(ACCOUNTANTS), self.accountant)

    @property
    def noise_std(self) -> float:
        """The standard deviation ``noise_multiplier * clip`` of the noise added to each coordinate of the sum."""
        return self.noise_multiplier * self.clip

    def clip_factors(self, norms: Tensor) -> Tensor:
        """``min(1, clip / norm)`` for every example's gradient norm (1 for a zero gradient)."""
        return torch.where(norms > self.clip, self.clip / norms.clamp_min(self.clip), torch.ones_like(norms))

    def clipped_sum(self, per_example: Mapping[str, Tensor], weights: Tensor) -> dict[str, Tensor]:
        """Per client, the sum of its examples' gradients, each first clipped to L2 norm ``clip``.

        ``per_example`` tensors are shaped (C, W, ...) (client, example slot); ``weights`` (C, W) is 1 for a
        sampled example and 0 for padding. Returns tensors shaped (C, ...).
        """
        factors = self.clip_factors(example_norms(per_example))
        scale = factors * weights.to(factors.dtype)
        return {
            key: torch.einsum("cw,cwp->cp", scale.to(value.dtype), value.flatten(2)).reshape(
                value.shape[:1] + value.shape[2:]
            )
            for key, value in per_example.items()
        }

    def privatise(
        self, summed: Mapping[str, Tensor], normaliser: Tensor, generators: Sequence[torch.Generator]
    ) -> dict[str, Tensor]:
        """``(sum + N(0, (noise_multiplier clip)^2 I)) / normaliser`` per client, noise from its own generator.

        ``summed`` tensors are shaped (C, ...), ``normaliser`` (C,) holds each client's expected batch size.
        """
        if not summed:
            return {}
        first = next(iter(summed.values()))
        sizes = [value[0].numel() for value in summed.values()]
        dtype = first.dtype if first.dtype.itemsize >= 4 else torch.float32
        noise = torch.empty(len(generators), sum(sizes), dtype=dtype)
        for row, generator in enumerate(generators):  # row c from client c's generator only
            torch.randn(noise.shape[1], generator=generator, dtype=dtype, out=noise[row])
        noise = noise.to(first.device)
        result = {}
        for (key, value), piece in zip(summed.items(), torch.split(noise, sizes, dim=1), strict=True):
            divisor = normaliser.to(dtype).view(-1, *[1] * (value.dim() - 1))
            noisy = torch.add(value.to(dtype), piece.reshape(value.shape), alpha=self.noise_std).div_(divisor)
            result[key] = noisy.to(value.dtype)
        return result

    def epsilon(self, rate: float, steps: int) -> float:
        """Epsilon at this group's ``delta`` after ``steps`` DP-SGD steps at sample rate ``rate``."""
        return epsilon(self.noise_multiplier, rate, steps, self.delta, self.accountant)


def build_dp(spec: Any, field: str = "defence.dp") -> DPSGD | None:
    """The DP-SGD settings of a ``defence.dp`` block (None: no DP-SGD); errors name the path under ``field``."""
    if spec is None:
        return None
    return construct_from_mapping(DPSGD, spec, field)
