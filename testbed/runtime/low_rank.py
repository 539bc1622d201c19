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
    gq = g.transpose(1, 2) @ q  # (C, out, R): G^T Q
    gram = (gq * root[:, None, :]).transpose(1, 2) @ (gq * root[:, None, :])  # lam^1/2 Q^T K_g Q lam^1/2
    power, z = torch.linalg.eigh(gram)
    left = ((gq * root[:, None, :]) @ z).cpu()
    right = (a.transpose(1, 2) @ (q * inverse[:, None, :]) @ z).cpu()
    significant = (power > power.amax(dim=1, keepdim=True) * RANK_TOLERANCE).cpu()
    factors: list[Factors] = []
    for c in range(len(power)):
        keep = significant[c].flip(0)  # largest singular value first
        kept_left, kept_right = left[c].flip(1)[:, keep], right[c].flip(1)[:, keep]
        peak = kept_right.abs().argmax(dim=0)
        sign = torch.sign(kept_right[peak, torch.arange(kept_right.shape[1])])
        factors.append((kept_left * sign, kept_right * sign))
    return factors
