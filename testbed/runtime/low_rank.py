"""A dense layer's per-client update as a thin SVD, taken from a chunk's rows without forming the matrix.

A client's update of a dense layer is W = G^T A (G: R x out error signals, A: R x in layer inputs, over
the R samples of all its local steps; the fused path keeps both). ``thin_factors`` returns W = L V^T with
V orthonormal (in x r) and L = W V (out x r, the left singular vectors times the singular values): the
thin SVD with its numerically zero singular values dropped and the sign of each component fixed (the
largest entry of each column of V positive; if the largest positive and negative entries tie in
magnitude, the first entry of largest magnitude). The pair
is therefore a function of W alone, not of the rows behind it (a test gives it M G and M^-T A for a
random invertible M: the same pair), so an attacker handed it learns what the formed update would tell
it; the one exception is an exact tie of singular values, where any basis of the tied subspace is the
SVD and the one returned depends on the rows (row lengths and cosines, what dense-ratio reads, do not).
It is computed from the R x R Gram matrix of the inputs, the triangle of an R-column QR and an R x R SVD, about
R^2 (in + out) + 2 R r (in + out) multiply-adds against out x in x R for the product, and travels as
r (out + in) numbers instead of out x in.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

INPUT_TOLERANCE = 1e-14
"""Eigenvalues of a client's input Gram matrix below this fraction of the largest count as zero."""
RANK_TOLERANCE = 1e-12
"""Singular values of the update below this fraction of the largest count as round-off (float64)."""

Factors = tuple[Tensor, Tensor]
"""(L, V): a matrix W = L @ V.T with V's columns orthonormal."""


def _through_numpy(x: Tensor) -> bool:
    """Whether the factorisation of ``x`` runs through numpy (on the CPU) rather than torch (CUDA)."""
    return x.device.type == "cpu"


def _bmm(x: Tensor, y: Tensor) -> Tensor:
    """Batched ``x @ y``; on the CPU through numpy's matmul (about 2.5x torch's float64 bmm for these shapes)."""
    if _through_numpy(x) and _through_numpy(y):
        return torch.from_numpy(np.matmul(x.numpy(), y.numpy()))
    return x @ y


def _eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batched symmetric eigendecomposition, ascending (numpy's LAPACK call on the CPU)."""
    if _through_numpy(x):
        values, vectors = np.linalg.eigh(x.numpy())
        return torch.from_numpy(values), torch.from_numpy(vectors)
    lam, q = torch.linalg.eigh(x)
    return lam, q


def _triangle(x: Tensor) -> Tensor:
    """The R of a batched QR of tall matrices, without forming Q."""
    if _through_numpy(x):
        return torch.from_numpy(np.linalg.qr(x.numpy(), mode="r"))
    return torch.linalg.qr(x, mode="r")[1]


def _svd(x: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and descending singular values of a batch of square matrices."""
    if _through_numpy(x):
        u, values, _ = np.linalg.svd(x.numpy())
        return torch.from_numpy(u), torch.from_numpy(values)
    u, values, _ = torch.linalg.svd(x)
    return u, values


def worth_factoring(samples: int, rows: int, columns: int) -> bool:
    """Whether an update of rank at most ``samples`` travels and forms more cheaply factored (rows x columns)."""
    return 4 * samples <= min(rows, columns)


def thin_factors(signals: Tensor, inputs: Tensor) -> list[Factors]:
    """Per client, the thin SVD (L, V) of ``W = signals[c].T @ inputs[c]``, in float64 on the CPU.

    ``signals`` is (C, R, out) and ``inputs`` (C, R, in); rows whose signal is zero (padding, zero weight)
    are dropped with their inputs. With the R x R Gram matrix K_a = A A^T = Q diag(lam) Q^T, the rows of
    Y = diag(lam)^-1/2 Q^T A are orthonormal and W = G^T A = S^T Y for S = diag(lam)^1/2 Q^T G (R x out).
    The SVD S = U diag(s) X^T (U and s from the SVD of the R x R triangle of a QR of S^T, so s is
    accurate to round-off of the largest, not of its square) gives L = S^T U (= X diag(s), taken as a
    product so that a row driven by one sample alone keeps its own relative accuracy however faint) and
    V = Y^T U. Input directions
    with lam below ``INPUT_TOLERANCE`` of the largest (repeated samples) carry nothing; components with
    s below ``RANK_TOLERANCE`` of the largest are round-off and dropped. A sample that drives a row only
    faintly keeps its own component (tested down to 1e-9 of the strongest signal).
    """
    rows = signals.detach()
    live = (rows.amax(dim=2, keepdim=True) > 0) | (rows.amin(dim=2, keepdim=True) < 0)  # a nonzero signal
    g = signals.detach().to(torch.float64)
    a = inputs.detach().to(torch.float64)
    if not bool(live.all()):
        a = a * live  # a zero-signal row's input is not part of W
    lam, q = _eigh(_bmm(a, a.transpose(1, 2)))
    kept = lam > lam.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny) * INPUT_TOLERANCE
    root = torch.where(kept, lam.clamp_min(0.0).sqrt(), torch.zeros_like(lam))
    inverse = torch.where(kept, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(lam))
    # every product keeps the R rows first, so the long axes (out, in) stay contiguous
    scaled = _bmm((q * root[:, None, :]).transpose(1, 2).contiguous(), g)  # (C, R, out): S = lam^1/2 Q^T G
    u, values = _svd(_triangle(scaled.transpose(1, 2)).transpose(1, 2))  # S^T = basis @ T: S's U and s are T^T's
    left = _bmm(u.transpose(1, 2).contiguous(), scaled).cpu()  # (C, k, out): L^T = U^T S
    right = _bmm(((q * inverse[:, None, :]) @ u).transpose(1, 2).contiguous(), a).cpu()  # (C, k, in): V^T
    # the largest entry of each column of V positive (two reductions; no |V| is formed), and where the
    # largest and the most negative tie in magnitude, the first of the entries of largest magnitude
    high, low = right.amax(dim=2, keepdim=True), -right.amin(dim=2, keepdim=True)
    sign = torch.sign(high - low)
    tied = sign == 0
    if bool(tied.any()):
        first = torch.sign(torch.gather(right, 2, right.abs().argmax(dim=2, keepdim=True)))
        sign = torch.where(tied, first, sign)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)  # an all-zero column (dropped below)
    left *= sign
    right *= sign
    values = values.cpu()
    ranks = (values > values[:, :1] * RANK_TOLERANCE).sum(dim=1).tolist()  # a prefix: descending order
    return [(left[c, :rank].T, right[c, :rank].T) for c, rank in enumerate(ranks)]
