"""Independent component analysis for the cocktail-party attack, batched over several mixture matrices.

Kariyappa et al., "Cocktail Party Attack: Breaking Aggregation-Based Privacy in Federated Learning using
Independent Component Analysis", ICML 2023. Each mixture matrix ``G`` (``H x D``: H observed mixtures of
D-pixel signals) is centred per row and whitened to ``k`` components ``Z = K G_c`` (``k x D`` with
``Z Z^T / D = I``). An unmixing matrix ``U`` (``k x k``, rows scaled to unit norm) gives the sources
``S = U Z``, each with zero mean and unit variance, and ``C = U U^T`` is their correlation matrix. ``U``
minimises, per client,

    - negentropy_weight * mean_i J(S_i)  +  decorrelation_weight * R(C)  +  tv_weight * mean_i TV(S_i)

with ``J(s) = (mean log cosh(s) - E[log cosh(nu)])^2`` (Hyvärinen's negentropy approximation, ``nu`` a
standard normal variable), ``TV`` the mean absolute difference of adjacent pixels, and ``R`` one of

- ``log-det``: ``-log det(C) / k``, zero for orthogonal rows and infinite for linearly dependent ones; it
  is ``-2 log |det U| / k``, the volume term of maximum-likelihood ICA (Bell and Sejnowski 1995);
- ``exp-cosine``: ``mean_{i != j} exp(T |C_ij|)``, the penalty of Kariyappa et al.

Both discourage without forbidding correlated sources (two digits of one class are correlated), unlike the
hard orthogonality of FastICA; with no penalty every source collapses onto the same best one. All tensors
carry a leading client dimension; clients are optimised independently (the loss is a sum over clients and
Adam is elementwise), so a batch computes what separate runs would, up to round-off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor

from attacks.early_stop import Plateau
from attacks.lane_adam import LaneAdam

GAUSSIAN_LOGCOSH = 0.3745672075
"""E[log cosh(nu)] for a standard normal nu (numerical integration)."""

PENALTIES = ("log-det", "exp-cosine")

LOGDET_JITTER = 1e-5
"""Added to the diagonal of the sources' correlation matrix before its Cholesky factor is taken, so that
float32 round-off cannot make a nearly singular matrix (two sources almost equal) lose definiteness."""


@dataclass(frozen=True)
class IcaSettings:
    """The optimisation's hyper-parameters (see the module docstring for the objective)."""

    iterations: int
    lr: float
    negentropy_weight: float
    decorrelation: str
    decorrelation_weight: float
    temperature: float
    tv_weight: float
    seed: int
    rtol: float
    patience: int = 0
    min_delta: float = 0.0
    check_every: int = 25


@dataclass(frozen=True)
class Separation:
    """Recovered sources ``(n, k, D)`` (float64, CPU, zero mean and unit variance) and per-client numbers."""

    sources: Tensor
    rank: Tensor
    objective: Tensor
    max_correlation: Tensor
    iterations: Tensor


def whiten(mixtures: Tensor, components: int, rtol: float) -> tuple[Tensor, Tensor]:
    """Centre each mixture over its pixels and project onto the top ``components`` principal directions.

    ``mixtures`` is ``(n, H, D)``; returns the white signals ``(n, k, D)`` and the numerical rank of each
    client's centred mixtures (eigenvalues of their covariance above ``rtol`` times the largest).
    Eigenvalues below that are clamped to it, so a rank-deficient update gives noise components, not
    infinities.
    """
    centred = mixtures - mixtures.mean(dim=-1, keepdim=True)
    covariance = centred @ centred.transpose(-1, -2) / centred.shape[-1]
    values, vectors = torch.linalg.eigh(covariance)
    floor = rtol * values[..., -1:].clamp_min(torch.finfo(values.dtype).tiny)
    rank = (values > floor).sum(dim=-1)
    top_values = values[..., -components:].flip(-1).clamp_min(floor)
    top_vectors = vectors[..., -components:].flip(-1)
    projection = (top_vectors / top_values.sqrt().unsqueeze(-2)).transpose(-1, -2)
    return projection @ centred, rank


def _logcosh(values: Tensor) -> Tensor:
    """log cosh(x) = x + log(1 + exp(-2x)) - log 2, stable for either sign of x."""
    return values + torch.nn.functional.softplus(-2 * values) - math.log(2.0)


def _total_variation(sources: Tensor, image_shape: tuple[int, ...]) -> Tensor:
    """Mean absolute difference of vertically and horizontally adjacent pixels, per source ``(n, k)``."""
    images = sources.reshape(*sources.shape[:2], *image_shape)
    pixel_dims = tuple(range(2, images.dim()))
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=pixel_dims)
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=pixel_dims)
    return vertical + horizontal


def _penalty(correlation: Tensor, settings: IcaSettings) -> Tensor:
    """The decorrelation penalty ``R(C)`` of each client ``(n,)``."""
    components = correlation.shape[-1]
    if settings.decorrelation == "log-det":
        jitter = LOGDET_JITTER * torch.eye(components, dtype=correlation.dtype, device=correlation.device)
        factor, _ = torch.linalg.cholesky_ex(correlation + jitter)
        return -2 * torch.diagonal(factor, dim1=-2, dim2=-1).log().sum(dim=-1) / components
    off_diagonal = ~torch.eye(components, dtype=torch.bool, device=correlation.device)
    return torch.exp(settings.temperature * correlation[:, off_diagonal].abs()).mean(dim=-1)


def objective(unmixing: Tensor, white: Tensor, image_shape: tuple[int, ...], settings: IcaSettings) -> Tensor:
    """The loss of each client ``(n,)``; ``image_shape`` is empty when there is no TV prior."""
    unit = unmixing / unmixing.norm(dim=-1, keepdim=True)
    sources = unit @ white
    negentropy = (_logcosh(sources).mean(dim=-1) - GAUSSIAN_LOGCOSH) ** 2
    loss = -settings.negentropy_weight * negentropy.mean(dim=-1)
    if unmixing.shape[-1] > 1 and settings.decorrelation_weight > 0:
        loss = loss + settings.decorrelation_weight * _penalty(unit @ unit.transpose(-1, -2), settings)
    if image_shape and settings.tv_weight > 0:
        loss = loss + settings.tv_weight * _total_variation(sources, image_shape).mean(dim=-1)
    return loss


def initial_unmixing(components: int, seed: int) -> Tensor:
    """A random orthogonal ``k x k`` matrix drawn from ``seed`` (float64; the same for every client)."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(components, components, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _optimise(
    unmixing: Tensor, white: Tensor, image_shape: tuple[int, ...], settings: IcaSettings
) -> tuple[Tensor, Tensor]:
    """Adam on every client's unmixing matrix at once; returns the matrices (float64, CPU) and the steps taken.

    With ``settings.patience`` > 0 a client stops once its objective has plateaued
    (``attacks.early_stop.Plateau``: no relative fall of ``min_delta`` in its best objective for
    ``patience`` steps, checked every ``check_every`` steps); its matrix is kept as it is after that step and
    it leaves the batch, the others continue with their Adam moments unchanged (Adam is elementwise).
    """
    lanes = len(unmixing)
    result = unmixing.clone()
    steps = torch.full((lanes,), settings.iterations, dtype=torch.long)
    plateau = Plateau(lanes, settings.patience, settings.min_delta, white.device)
    active = torch.arange(lanes)
    variable = unmixing.to(device=white.device, dtype=torch.float32)
    adam = LaneAdam(variable)
    for step in range(1, settings.iterations + 1):
        with torch.enable_grad():
            leaf = variable.detach().requires_grad_(True)
            values = objective(leaf, white, image_shape, settings)
            (gradient,) = torch.autograd.grad(values.sum(), leaf)
        adam.step(variable, gradient, settings.lr)
        if settings.patience == 0:
            continue
        plateau.observe(values.detach(), active.to(white.device))
        if step % settings.check_every or step == settings.iterations:
            continue
        flat = plateau.check(step)[active]
        if not bool(flat.any()):
            continue
        done = active[flat]
        result[done] = variable[flat].to(device="cpu", dtype=torch.float64)
        steps[done] = step
        active = active[~flat]
        if len(active) == 0:
            return result, steps
        keep = (~flat).to(white.device)
        white = white[keep]
        variable = variable[keep]
        adam.keep(keep)
    result[active] = variable.to(device="cpu", dtype=torch.float64)
    return result, steps


def separate(
    mixtures: Tensor,
    components: int,
    input_shape: tuple[int, ...],
    settings: IcaSettings,
    device: torch.device,
) -> Separation:
    """Unmix ``(n, H, D)`` mixture matrices into ``components`` sources each.

    Whitening and the final sources are computed in float64 on the CPU; the optimisation of the
    unmixing matrices runs in float32 on ``device``. TV applies when ``input_shape`` has a height and width.
    """
    if prod(input_shape) != mixtures.shape[-1]:
        raise ValueError(f"mixtures of {mixtures.shape[-1]} values do not match the input shape {input_shape}")
    image_shape = tuple(input_shape) if len(input_shape) >= 2 else ()
    white64, rank = whiten(mixtures.to(torch.float64), components, settings.rtol)
    start = initial_unmixing(components, settings.seed)
    unmixing = start.expand(len(mixtures), -1, -1).clone()
    steps = torch.zeros(len(mixtures), dtype=torch.long)
    if components > 1:
        unmixing, steps = _optimise(unmixing, white64.to(device=device, dtype=torch.float32), image_shape, settings)
    with torch.no_grad():
        unit = unmixing / unmixing.norm(dim=-1, keepdim=True)
        correlation = (unit @ unit.transpose(-1, -2)).abs() - torch.eye(components, dtype=torch.float64)
        return Separation(
            sources=unit @ white64,
            rank=rank,
            objective=objective(unmixing, white64, image_shape, settings),
            max_correlation=correlation.flatten(1).amax(dim=-1),
            iterations=steps,
        )


def to_images(sources: Tensor) -> Tensor:
    """Label-free sign, offset and scale from the sources alone: positive skew, median at 0, maximum at 1.

    The fallback when the first dense layer has no bias gradient to calibrate against (``calibrate``). It
    assumes images of a few bright strokes on a dark background that fills most pixels (MNIST): their pixel
    distribution is skewed to the right and its median is the background. On large bright objects
    (Fashion-MNIST garments) it flips them into negatives. ``sources`` is ``(..., D)``; returns float32 in
    [0, 1].
    """
    skew = (sources - sources.mean(dim=-1, keepdim=True)).pow(3).mean(dim=-1, keepdim=True)
    signed = torch.where(skew < 0, -sources, sources)
    shifted = signed - signed.median(dim=-1, keepdim=True).values
    peak = shifted.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(shifted.dtype).tiny)
    return (shifted / peak).clamp(0.0, 1.0).to(torch.float32)


CALIBRATION_RTOL = 1e-3
"""A client's bias calibration is used when ``gW`` and ``gb`` are explained by the recovered sources to this
relative residual (each); otherwise ``to_images`` decides."""


@dataclass(frozen=True)
class Calibration:
    """Images ``(n, k, D)`` float32 in [0, 1], and per client whether the bias gradient fixed them (``(n,)``
    bool) with the relative residuals of the two fits (``(n,)``)."""

    images: Tensor
    by_bias: Tensor
    residual: Tensor


def calibrate(sources: Tensor, weight_gradient: Tensor, bias_gradient: Tensor | None) -> Calibration:
    """Each source's sign, scale and offset from the first dense layer's own gradients.

    A dense layer reading the inputs ``x_n`` has ``gW = sum_n a_n x_n^T`` and ``gb = sum_n a_n`` with the same
    per-sample columns ``a_n`` (FedSGD, or the sum of the steps of a delta). A recovered source is
    ``s_n = (x_n - m_n) / beta_n`` for an unknown scale ``beta_n`` (its sign included) and offset ``m_n``.
    Centring ``gW`` over the pixels gives ``gW_c = M S`` with ``M = A diag(beta)`` (a least-squares fit of
    ``gW_c`` on the sources) and its row means ``c = A m``; the bias gives ``gb = A 1 = M w`` with
    ``w = 1 / beta``. So ``w`` is the least-squares solution of ``M w = gb``, ``A = M diag(w)``, ``m`` that of
    ``A m = c``, and the images are ``beta_n s_n + m_n``, clipped to [0, 1]: no assumption about how images
    look. Clients whose fits leave a relative residual above ``CALIBRATION_RTOL`` (sources that do not span
    the update, a layer without bias: ``bias_gradient`` None) fall back to ``to_images``.

    ``sources`` ``(n, k, D)`` (float64), ``weight_gradient`` ``(n, H, D)``, ``bias_gradient`` ``(n, H)``.
    """
    fallback = to_images(sources)
    lanes = sources.shape[0]
    if bias_gradient is None:
        return Calibration(fallback, torch.zeros(lanes, dtype=torch.bool), torch.full((lanes,), math.inf))
    sources = sources.to(torch.float64)
    weight_gradient = weight_gradient.to(torch.float64)
    bias = bias_gradient.to(torch.float64).unsqueeze(-1)
    means = weight_gradient.mean(dim=-1, keepdim=True)
    centred = weight_gradient - means
    mixing = torch.linalg.lstsq(sources.transpose(-1, -2), centred.transpose(-1, -2)).solution.transpose(-1, -2)
    inverse_scale = torch.linalg.lstsq(mixing, bias).solution
    columns = mixing * inverse_scale.transpose(-1, -2)
    offsets = torch.linalg.lstsq(columns, means).solution
    tiny = torch.finfo(torch.float64).tiny
    fit_weight = (mixing @ sources - centred).flatten(1).norm(dim=-1) / centred.flatten(1).norm(dim=-1).clamp_min(tiny)
    fit_bias = (mixing @ inverse_scale - bias).flatten(1).norm(dim=-1) / bias.flatten(1).norm(dim=-1).clamp_min(tiny)
    residual = torch.maximum(fit_weight, fit_bias)
    images = sources / inverse_scale + offsets
    usable = (residual <= CALIBRATION_RTOL) & torch.isfinite(images).flatten(1).all(dim=-1)
    calibrated = images.nan_to_num(0.0).clamp(0.0, 1.0).to(torch.float32)
    return Calibration(torch.where(usable[:, None, None], calibrated, fallback), usable, residual)
