"""The simulation's ground truth for scoring: which samples a Flower client trained on.

A ClientApp calls ``record_trained(context, partition_id, indices)`` with the training-set positions of the
samples its local training used (in order); ``ground_truth_mod``, a client Mod, moves them into the reply under
``GROUND_TRUTH_KEY``. ``AuditedStrategy`` removes that record before anything else reads the reply and hands it to
the scorer only: the attacks never see it. Only a simulation has this; a real deployment sends no such record,
and the audit then logs the reconstructions and the attacks' diagnostics, not leakage scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import ConfigRecord, Context, Message

GROUND_TRUTH_KEY = "testbed.ground-truth"
"""The ConfigRecord (in the reply, and in the ClientApp's context state) holding the trained samples."""


def record_trained(context: Context, partition_id: int, indices: Sequence[int] | np.ndarray) -> None:
    """Keep the training-set positions the client's local training used, for ``ground_truth_mod``."""
    context.state[GROUND_TRUTH_KEY] = ConfigRecord(
        {"partition-id": int(partition_id), "sample-indices": [int(i) for i in np.asarray(indices).ravel()]}
    )


def ground_truth_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A client Mod: after the ClientApp's training, attach the samples it recorded (simulation only)."""
    reply = call_next(message, context)
    state = context.state
    if GROUND_TRUTH_KEY in state and not reply.has_error():
        reply.content[GROUND_TRUTH_KEY] = state[GROUND_TRUTH_KEY]
        del state[GROUND_TRUTH_KEY]
    return reply
