"""A dense layer's per-client update as a thin SVD, taken from a chunk's rows without forming the matrix.

A client's update of a dense layer is W = G^T A (G: R x out error signals, A: R x in layer inputs, over
the R samples of all its local steps; the fused path keeps both). ``thin_factors`` returns W = L V^T with
V orthonormal (in x r) and L = U S (out x r): the thin SVD with its numerically zero singular values
dropped and the sign of each component fixed (the largest entry of each column of V positive). The pair
is therefore a function of W alone, not of the rows behind it (a test gives it M G and M^-T A for a
random invertible M: the same pair), so an attacker handed it learns exactly what the formed update
would tell it. It is computed from R x R Gram matrices (about R^2 (in + out) + 2 R r (in + out)
multiply-adds and two R x R eigendecompositions, against out x in x R for the product), and travels
as r (out + in) numbers instead of out x in.
"""

from __future__ import annotations

import torch
from torch import Tensor

RANK_TOLERANCE = 1e-14
"""Eigenvalues (squared singular values) below this fraction of the largest count as zero."""

Factors = tuple[Tensor, Tensor]
"""(L, V): a matrix W = L @ V.T with V's columns orthonormal."""


def worth_factoring(samples: int, rows: int, columns: int) -> bool:
    """Whether an update of rank at most ``samples`` travels and forms more cheaply factored (rows x columns)."""
    return 4 * samples <= min(rows, columns)


def thin_factors(signals: Tensor, inputs: Tensor) -> list[Factors]:
    """Per client, the thin SVD (L, V) of ``W = signals[c].T @ inputs[c]``, in float64 on the CPU.

    ``signals`` is (C, R, out) and ``inputs`` (C, R, in); rows of zeros (padding) add nothing. Through the
    R x R Gram matrices K_a = A A^T and K_g = G G^T: with K_a = Q diag(lam) Q^T and the eigenvectors Z
    (eigenvalues s^2) of diag(lam)^1/2 Q^T K_g Q diag(lam)^1/2, V = A^T Q diag(lam)^-1/2 Z and
    L = W V = G^T Q diag(lam)^1/2 Z. Components below ``RANK_TOLERANCE`` of the largest (in lam, then in
    s^2) are dropped: they hold less than a float32 rounding of W.
    """
    g = signals.detach().to(torch.float64)
    a = inputs.detach().to(torch.float64)
    lam, q = torch.linalg.eigh(a @ a.transpose(1, 2))
    kept = lam > lam.amax(dim=1, keepdim=True) * RANK_TOLERANCE
    root = torch.where(kept, lam.clamp_min(0.0).sqrt(), torch.zeros_like(lam))
    inverse = torch.where(kept, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(lam))
    # every product keeps the R rows first, so the long axes (out, in) stay contiguous
    scaled = (q * root[:, None, :]).transpose(1, 2) @ g  # (C, R, out): lam^1/2 Q^T G
    power, z = torch.linalg.eigh(scaled @ scaled.transpose(1, 2))
    power, z = power.flip(1).cpu(), z.flip(2)  # largest singular value first
    left = (z.transpose(1, 2) @ scaled).cpu()  # (C, R, out): L^T
    right = (((q * inverse[:, None, :]) @ z).transpose(1, 2) @ a).cpu()  # (C, R, in): V^T
    sign = torch.sign(torch.gather(right, 2, right.abs().argmax(dim=2, keepdim=True)))  # largest entry positive
    left *= sign
    right *= sign
    ranks = (power > power[:, :1] * RANK_TOLERANCE).sum(dim=1).tolist()  # a prefix: descending order
    return [(left[c, :rank].T, right[c, :rank].T) for c, rank in enumerate(ranks)]
