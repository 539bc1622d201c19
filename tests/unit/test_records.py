"""Records that cross processes: tensors travel as numpy buffers and come back equal."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import torch

from testbed.runtime.records import ChunkPayload, ClientUpdate


def _roundtrip(value: object) -> object:
    buffers: list[pickle.PickleBuffer] = []
    blob = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    assert buffers, "tensors should travel out of band"
    return pickle.loads(blob, buffers=buffers)


def test_client_update_and_payload_survive_pickling_out_of_band() -> None:
    stack = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4)
    update = ClientUpdate(
        client=7,
        group="g",
        round=2,
        update={"w": stack[1], "b": torch.ones(2)},  # a view into a larger stack travels alone
        num_samples=4,
        batch_size=4,
        local_steps=1,
        labels=np.array([1, 2, 3, 4]),
    )
    back = _roundtrip(update)
    assert isinstance(back, ClientUpdate)
    assert torch.equal(back.update["w"], stack[1]) and torch.equal(back.update["b"], torch.ones(2))
    assert (back.client, back.group, back.round, list(back.labels)) == (7, "g", 2, [1, 2, 3, 4])
    payload = ChunkPayload(index=3, group="g", weighted_sum={"w": stack[0] * 2}, weight=5.0, audited=[update])
    again = _roundtrip(payload)
    assert isinstance(again, ChunkPayload)
    assert again.weighted_sum is not None and torch.equal(again.weighted_sum["w"], stack[0] * 2)
    assert again.weight == 5.0 and torch.equal(again.audited[0].update["w"], stack[1])
    empty = _roundtrip(ChunkPayload(index=0, group="g", weighted_sum=None, weight=0.0, audited=[update]))
    assert isinstance(empty, ChunkPayload) and empty.weighted_sum is None


def test_audit_actors_lower_their_own_priority() -> None:
    code = (
        "import os; from testbed.audit.priority import lower_priority; "
        "before = os.nice(0); lower_priority(5); print(before, os.nice(0))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(int, done.stdout.split())
    assert after == min(19, before + 5)
