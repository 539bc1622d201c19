"""What an attack sees and what it answers, as the aggregator records them.

``attacker_view`` turns one received ``ClientUpdate`` into an ``AttackerView`` (model, global parameters,
update, public hyper-parameters; never the client's data); an ``AuditOutcome`` is the attack's answer for
that client, which the scorer later joins with the simulator's ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks import AttackerView, ClientLoss, Reconstruction
from testbed.config.schema import Experiment
from testbed.runtime.records import ClientUpdate, Params


@dataclass
class AuditOutcome:
    """One attacked update: who it came from and what the attack made of it (or why it could not)."""

    client: int
    group: str
    round: int
    aggregator: str
    reconstruction: Reconstruction | None
    not_applicable: str | None = None
    seconds: float = 0.0
    attack: str = ""


def attacker_view(
    update: ClientUpdate,
    global_params: Params,
    model: nn.Module,
    experiment: Experiment,
    input_shape: tuple[int, ...],
    num_classes: int,
    loss: ClientLoss,
    keep_factors: bool = False,
    one_pass: bool = False,
) -> AttackerView:
    """What the threat model lets the server know about one client's update (``loss``: the loss its group
    declared, with its parameters: the threat model makes it public).

    A weight the client sent as a thin SVD (``ClientUpdate.factors``) is multiplied out, unless
    ``keep_factors`` (every attack to run reads factors: ``Attack.reads_factors``) passes it as it came.
    ``one_pass``: the update's group trains one pass of a shuffling loader (``one_pass_groups``).
    """
    labels = torch.as_tensor(update.labels) if update.labels is not None else None
    algorithm = experiment.algorithm
    sent = update.update if keep_factors else update.formed()
    return AttackerView(
        model=model,
        global_params={key: value for key, value in global_params.items() if key in sent or key in update.factors},
        update={key: value.clone() for key, value in sent.items()},  # received tensors are read-only
        factors=dict(update.factors) if keep_factors else {},
        kind="gradient" if algorithm.name == "fedsgd" else "delta",
        batch_size=update.batch_size,
        num_samples=update.num_samples,
        local_steps=update.local_steps,
        lr=algorithm.lr,
        loss=loss,
        input_shape=input_shape,
        num_classes=num_classes,
        labels=labels,
        one_pass=one_pass and algorithm.name == "fedavg",
    )


def one_pass_groups(experiment: Experiment) -> set[str]:
    """The client groups whose FedAvg local steps are one pass of a shuffling loader over their samples: random
    batching, no DP-SGD, one local epoch and no step cap (their short last batch is public knowledge)."""
    from defenses import build_policy

    algorithm = experiment.algorithm
    if algorithm.name != "fedavg" or algorithm.local_steps is not None or (algorithm.local_epochs or 1) != 1:
        return set()
    found = set()
    for group in experiment.clients:
        policy = build_policy(group.defence)
        if policy.batching.name == "random" and policy.dp is None:
            found.add(group.group)
    return found
