"""A dense layer's per-client update as a thin SVD, taken from a chunk's rows without forming the matrix.

A client's update of a dense layer is W = G^T A (G: R x out error signals, A: R x in layer inputs, over
the R samples of all its local steps; the fused path keeps both). ``thin_factors`` returns W = L V^T with
V orthonormal (in x r) and L = U S (out x r): the thin SVD with its numerically zero singular values
dropped and the sign of each component fixed (the largest entry of each column of V positive). The pair
is therefore a function of W alone, not of the rows behind it (a test gives it M G and M^-T A for a
random invertible M: the same pair), so an attacker handed it learns what the formed update would tell
it; the one exception is an exact tie of singular values, where any basis of the tied subspace is the
SVD and the one returned depends on the rows (row lengths and cosines, what dense-ratio reads, do not).
It is computed from the R x R Gram matrix of the inputs and an R-column QR and SVD, about
R^2 (in + out) + 2 R r (in + out) multiply-adds against out x in x R for the product, and travels as
r (out + in) numbers instead of out x in.
"""

from __future__ import annotations

import torch
from torch import Tensor

INPUT_TOLERANCE = 1e-14
"""Eigenvalues of a client's input Gram matrix below this fraction of the largest count as zero."""
RANK_TOLERANCE = 1e-12
"""Singular values of the update below this fraction of the largest count as round-off (float64)."""

Factors = tuple[Tensor, Tensor]
"""(L, V): a matrix W = L @ V.T with V's columns orthonormal."""


def worth_factoring(samples: int, rows: int, columns: int) -> bool:
    """Whether an update of rank at most ``samples`` travels and forms more cheaply factored (rows x columns)."""
    return 4 * samples <= min(rows, columns)


def thin_factors(signals: Tensor, inputs: Tensor) -> list[Factors]:
    """Per client, the thin SVD (L, V) of ``W = signals[c].T @ inputs[c]``, in float64 on the CPU.

    ``signals`` is (C, R, out) and ``inputs`` (C, R, in); rows whose signal is zero (padding, zero weight)
    are dropped with their inputs. With the R x R Gram matrix K_a = A A^T = Q diag(lam) Q^T, the rows of
    Y = diag(lam)^-1/2 Q^T A are orthonormal and W = G^T A = S^T Y for S = diag(lam)^1/2 Q^T G (R x out).
    The SVD S = U diag(s) X^T (through a QR of S^T and the SVD of its R x R triangle, so s is accurate
    to round-off of the largest, not of its square) gives L = X diag(s) and V = Y^T U. Input directions
    with lam below ``INPUT_TOLERANCE`` of the largest (repeated samples) carry nothing; components with
    s below ``RANK_TOLERANCE`` of the largest are round-off and dropped. A sample that drives a row only
    faintly keeps its own component (tested down to 1e-9 of the strongest signal).
    """
    g = signals.detach().to(torch.float64)
    live = (g != 0).any(dim=2, keepdim=True)
    a = inputs.detach().to(torch.float64) * live  # a zero-signal row's input is not part of W
    lam, q = torch.linalg.eigh(a @ a.transpose(1, 2))
    kept = lam > lam.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny) * INPUT_TOLERANCE
    root = torch.where(kept, lam.clamp_min(0.0).sqrt(), torch.zeros_like(lam))
    inverse = torch.where(kept, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(lam))
    # every product keeps the R rows first, so the long axes (out, in) stay contiguous
    scaled = (q * root[:, None, :]).transpose(1, 2) @ g  # (C, R, out): lam^1/2 Q^T G
    basis, triangle = torch.linalg.qr(scaled.transpose(1, 2))  # S^T = basis @ triangle
    u, values, vh = torch.linalg.svd(triangle.transpose(1, 2))  # descending singular values
    xh = vh @ basis.transpose(1, 2)  # S = U diag(s) X^T with X^T = vh basis^T
    left = (values[:, :, None] * xh).cpu()  # (C, k, out): L^T
    right = (((q * inverse[:, None, :]) @ u).transpose(1, 2) @ a).cpu()  # (C, k, in): V^T
    sign = torch.sign(torch.gather(right, 2, right.abs().argmax(dim=2, keepdim=True)))  # largest entry positive
    left *= sign
    right *= sign
    values = values.cpu()
    ranks = (values > values[:, :1] * RANK_TOLERANCE).sum(dim=1).tolist()  # a prefix: descending order
    return [(left[c, :rank].T, right[c, :rank].T) for c, rank in enumerate(ranks)]
