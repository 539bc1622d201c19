"""Update transforms: what a client does to its update before sending it, applied per client.

An update is a stack of C clients' updates: every tensor has a leading client dimension and the
parameter names of ``model.named_parameters()``. Each transform treats every client on its own, draws
randomness only from that client's generator, and returns new tensors.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from defenses.errors import ParameterError
from defenses.parts import Part
from defenses.registry import Registry


class UpdateTransform(Part, abc.ABC):
    """A per-client transformation of a stacked update."""

    @abc.abstractmethod
    def apply(self, update: dict[str, Tensor], generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
        """Transform each client's update (leading dimension C == len(generators)); inputs stay untouched."""


TRANSFORMS: Registry[UpdateTransform] = Registry("transform", UpdateTransform)


def client_count(update: Mapping[str, Tensor], generators: Sequence[torch.Generator]) -> int:
    """The number of clients C in the stack, checked against every tensor and the generators."""
    clients = len(generators)
    for key, value in update.items():
        if value.dim() == 0 or value.shape[0] != clients:
            raise ValueError(
                f"update[{key!r}] has shape {tuple(value.shape)}; expected a leading dimension {clients}"
            )
    return clients


def _wide(value: Tensor) -> Tensor:
    """``value`` in at least single precision, for sums of squares and rounding."""
    return value if value.dtype == torch.float64 else value.float()


def flatten(update: Mapping[str, Tensor]) -> Tensor:
    """All of each client's entries side by side: a (C, D) tensor in at least single precision."""
    return torch.cat([_wide(value).reshape(value.shape[0], -1) for value in update.values()], dim=1)


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a (C, D) tensor back into tensors shaped and typed like ``like``."""
    sizes = [value[0].numel() for value in like.values()]
    pieces = torch.split(flat, sizes, dim=1)
    return {
        key: piece.reshape(value.shape).to(value.dtype)
        for (key, value), piece in zip(like.items(), pieces, strict=True)
    }


def client_norms(update: Mapping[str, Tensor]) -> Tensor:
    """Each client's global L2 norm over all its tensors: shape (C,)."""
    squares = [_wide(value).reshape(value.shape[0], -1).pow(2).sum(dim=1) for value in update.values()]
    return torch.stack(squares).sum(dim=0).sqrt()


def client_draws(
    generators: Sequence[torch.Generator], size: int, kind: Literal["normal", "uniform"], like: Tensor
) -> Tensor:
    """(C, size) random draws, row i from generator i only, in the dtype and device of ``like``."""
    draw = torch.randn if kind == "normal" else torch.rand
    rows = [
        draw(size, generator=generator, device=generator.device, dtype=like.dtype) for generator in generators
    ]
    return torch.stack(rows).to(like.device) if rows else like.new_zeros((0, size))


@TRANSFORMS.add
@dataclass(frozen=True)
class ClipL2(UpdateTransform):
    """Scale each client's update down to global L2 norm ``norm`` when above it (Abadi et al. 2016).

    Updates with norm at most ``norm`` pass unchanged.
    """

    name: ClassVar[str] = "clip-l2"
    main_parameter: ClassVar[str | None] = "norm"

    norm: float

    def __post_init__(self) -> None:
        if not self.norm > 0 or math.isinf(self.norm):
            raise ParameterError("norm", "a positive finite number", self.norm)

    def apply(self, update: dict[str, Tensor], generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
        """Per client: multiply by ``min(1, norm / ||update||)``."""
        client_count(update, generators)
        if not update:
            return {}
        norms = client_norms(update)
        factor = torch.where(
            norms > self.norm, self.norm / norms.clamp_min(self.norm), torch.ones_like(norms)
        )
        return {
            key: value * factor.to(value.dtype).view(-1, *[1] * (value.dim() - 1))
            for key, value in update.items()
        }


@TRANSFORMS.add
@dataclass(frozen=True)
class GaussianNoise(UpdateTransform):
    """Add independent N(0, sigma^2) noise to every entry of each client's update.

    Give ``sigma`` directly, or ``noise_multiplier`` and ``clip_norm`` for
    ``sigma = noise_multiplier * clip_norm`` as in DP-SGD (Abadi et al. 2016). This transform does not
    clip: put ``clip-l2`` with the same norm before it.
    """

    name: ClassVar[str] = "gaussian-noise"
    main_parameter: ClassVar[str | None] = "sigma"

    sigma: float | None = None
    noise_multiplier: float | None = None
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.sigma is not None and self.noise_multiplier is not None:
            raise ParameterError("sigma", "not allowed together with noise_multiplier", self.sigma)
        if self.sigma is None and self.noise_multiplier is None:
            raise ParameterError("sigma", "required unless noise_multiplier and clip_norm are given", None)
        if self.sigma is not None:
            _non_negative("sigma", self.sigma)
            if self.clip_norm is not None:
                raise ParameterError("clip_norm", "only used with noise_multiplier", self.clip_norm)
            return
        _non_negative("noise_multiplier", self.noise_multiplier)
        if self.clip_norm is None or not self.clip_norm > 0 or math.isinf(self.clip_norm):
            raise ParameterError(
                "clip_norm", "a positive finite number, required with noise_multiplier", self.clip_norm
            )

    @property
    def std(self) -> float:
        """The standard deviation of the added noise."""
        if self.sigma is not None:
            return self.sigma
        assert self.noise_multiplier is not None and self.clip_norm is not None
        return self.noise_multiplier * self.clip_norm

    def apply(self, update: dict[str, Tensor], generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
        """Per client: add noise drawn from that client's generator."""
        client_count(update, generators)
        if not update:
            return {}
        flat = flatten(update)
        noise = client_draws(generators, flat.shape[1], "normal", flat)
        return unflatten(flat + self.std * noise, update)


def _non_negative(parameter: str, value: float | None) -> None:
    """Reject a missing, negative or infinite value."""
    if value is None or not value >= 0 or math.isinf(value):
        raise ParameterError(parameter, "a finite number >= 0", value)


@TRANSFORMS.add
@dataclass(frozen=True)
class Prune(UpdateTransform):
    """Keep each client's ``keep`` fraction of largest-magnitude entries and zero the rest.

    The fraction is taken over all of a client's tensors together (the pruning defence of Zhu et al.
    2019 with pruning ratio ``1 - keep``); ``ceil(keep * D)`` of the client's D entries are kept.
    """

    name: ClassVar[str] = "prune"
    main_parameter: ClassVar[str | None] = "keep"

    keep: float

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ParameterError("keep", "a fraction in (0, 1] of entries to keep", self.keep)

    def apply(self, update: dict[str, Tensor], generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
        """Per client: zero all but the largest-magnitude entries."""
        client_count(update, generators)
        if not update:
            return {}
        flat = flatten(update)
        kept = min(flat.shape[1], math.ceil(self.keep * flat.shape[1]))
        largest = flat.abs().topk(kept, dim=1).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter(1, largest, True)
        return unflatten(torch.where(mask, flat, torch.zeros_like(flat)), update)


@TRANSFORMS.add
@dataclass(frozen=True)
class Quantize(UpdateTransform):
    """Uniform quantisation of each client's update to ``2**bits`` levels between its min and max.

    ``rounding: stochastic`` (default) rounds up with probability equal to the remainder, so the result
    is unbiased (as in QSGD, Alistarh et al. 2017); ``deterministic`` rounds to the nearest level.
    """

    name: ClassVar[str] = "quantize"
    main_parameter: ClassVar[str | None] = "bits"

    bits: int = 8
    rounding: Literal["stochastic", "deterministic"] = "stochastic"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ParameterError("bits", "an integer from 1 to 16", self.bits)
        if self.rounding not in ("stochastic", "deterministic"):
            raise ParameterError("rounding", "'stochastic' or 'deterministic'", self.rounding)

    def apply(self, update: dict[str, Tensor], generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
        """Per client: snap every entry to one of ``2**bits`` evenly spaced levels."""
        client_count(update, generators)
        if not update:
            return {}
        flat = flatten(update)
        top = 2**self.bits - 1
        low = flat.min(dim=1, keepdim=True).values
        high = flat.max(dim=1, keepdim=True).values
        step = (high - low) / top
        scaled = (flat - low) / torch.where(step > 0, step, torch.ones_like(step))
        if self.rounding == "stochastic":
            level = torch.floor(scaled + client_draws(generators, flat.shape[1], "uniform", flat))
        else:
            level = torch.round(scaled)
        return unflatten(low + level.clamp(0, top) * step, update)
