"""Ragged local batches of a few clients, and their stacked form: shared by the client-computation tests."""

from __future__ import annotations

import torch

from testbed.runtime.local_update import StackedBatches
from testbed.runtime.models import build_model

SIZES = [[5, 5, 2], [5, 3], [4]]  # per client: the sizes of its local batches (ragged on purpose)


Clients = list[list[tuple[torch.Tensor, ...]]]


def setup_clients(model_name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Clients]:
    """A small model of ``model_name``, its parameters, and three clients' ragged local batches."""
    shape = (1, 12, 12) if model_name != "lenet" else (1, 28, 28)
    model = build_model(model_name, shape, 10, hidden=[16], activation="sigmoid", seed=3)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    clients = [
        [
            (torch.rand(size, *shape, generator=generator), torch.randint(0, 10, (size,), generator=generator))
            for size in sizes
        ]
        for sizes in SIZES
    ]
    return model, params, clients


def stack(clients: Clients) -> StackedBatches:
    """The clients' batches stacked and zero-padded, with weights marking the real samples."""
    steps = max(len(batches) for batches in clients)
    width = max(x.shape[0] for batches in clients for x, _ in batches)
    shape = clients[0][0][0].shape[1:]
    x = torch.zeros(len(clients), steps, width, *shape)
    y = torch.zeros(len(clients), steps, width, dtype=torch.int64)
    w = torch.zeros(len(clients), steps, width)
    for c, batches in enumerate(clients):
        for s, (xb, yb) in enumerate(batches):
            x[c, s, : len(yb)], y[c, s, : len(yb)], w[c, s, : len(yb)] = xb, yb, 1.0
    return StackedBatches(x, y, w)


def norms(update: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each client's L2 norm over every parameter of a stacked update."""
    return torch.stack([v.reshape(v.shape[0], -1).pow(2).sum(1) for v in update.values()]).sum(0).sqrt()
