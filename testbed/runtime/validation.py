"""Server-side checks of client updates, applied per client before anything is aggregated.

They run where the updates are (in the worker, before its chunk sum), but they are the server's
rules: a rejected update never reaches the global model, and each rejection is counted by reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from testbed.runtime.local_update import flat_norms
from testbed.runtime.records import Params


def structure_problem(update: Mapping[str, Tensor], params: Params, *, stacked: int | None = None) -> str | None:
    """'shape' or 'dtype' when ``update`` does not match the model's parameters, else None.

    ``stacked`` is the leading client dimension of a stack of updates, or None for one client's update.
    """
    if set(update) != set(params):
        return "shape"
    for name, value in params.items():
        expected = value.shape if stacked is None else (stacked, *value.shape)
        if tuple(update[name].shape) != tuple(expected):
            return "shape"
        if update[name].dtype != value.dtype:
            return "dtype"
    return None


def validate_stack(update: Params, params: Params, max_norm: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per client of a stacked update: the accept mask and the mask of each rejection reason."""
    clients = next(iter(update.values())).shape[0]
    problem = structure_problem(update, params, stacked=clients)
    if problem is not None:
        reject = torch.ones(clients, dtype=torch.bool)
        return ~reject, {problem: reject}
    norms = flat_norms(update)
    finite = torch.isfinite(norms)
    for row in (~finite).nonzero().flatten().tolist():
        finite[row] = all(bool(torch.isfinite(value[row]).all()) for value in update.values())
    overflow = finite & ~torch.isfinite(norms)
    reasons = {"non_finite": ~finite}
    accept = finite & ~overflow
    if max_norm is not None:
        too_big = accept & (norms > max_norm)
        accept &= ~too_big
        reasons["norm"] = too_big | overflow
    elif bool(overflow.any()):
        reasons["norm"] = overflow
    return accept, reasons
