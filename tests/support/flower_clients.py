"""A ClientApp for the Flower tests: the example app's, except that client 0 replies with a wrong-shape array.

It lives in an importable module because Flower's Ray workers import the ClientApp by name.
"""

from __future__ import annotations

import flower_app  # topologies/flower, on sys.path in the tests that use this module
import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from testbed.integrations.flower import ground_truth_mod

BROKEN_CLIENT = 0

broken_client_app = ClientApp(mods=[ground_truth_mod])


@broken_client_app.train()
def train(message: Message, context: Context) -> Message:
    """The example client's training; client 0 then sends its first weight transposed and one row short."""
    reply = flower_app.train(message, context)
    if int(context.node_config["partition-id"]) == BROKEN_CLIENT:
        arrays = reply.content.array_records["arrays"]
        name = next(iter(arrays))
        arrays[name] = Array(np.ascontiguousarray(arrays[name].numpy().T[:-1]))
    return reply
