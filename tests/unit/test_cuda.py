"""Clients and attacks on CUDA give the CPU's results to float32 tolerance (skipped without a CUDA device).

The CPU and the GPU sum in different orders, so results agree to a tolerance, not bit for bit: a chunk's
weighted sum of gradients is a few thousand float32 products and sums per entry, whose relative
round-off is at most a few hundred ulps (1e-7 each); 1e-4 relative to the largest entry leaves a wide
margin and still catches a wrong reduction, a dropped client or a mis-scaled update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testbed.config.topology import validate
from testbed.data.partition import partition
from testbed.runtime.records import ChunkTask
from testbed.runtime.simulation import SimulationContext, simulate_chunk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

RELATIVE = 1e-4
DEVICES = ("cpu", "cuda")


def _experiment(model: dict[str, object], algorithm: dict[str, object], defence: dict[str, object]) -> object:
    return validate(
        {
            "name": "cuda",
            "rounds": 1,
            "dataset": {"name": "synthetic", "synthetic_shape": [1, 28, 28]},
            "model": model,
            "algorithm": algorithm,
            "clients": [{"group": "a", "count": 16, "batch_size": 8, "defence": defence}],
        }
    )


def _array(value: object) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


@pytest.mark.parametrize(
    ("model", "algorithm", "defence"),
    [
        ({"name": "mlp", "hidden": [64]}, {"name": "fedsgd"}, {}),
        ({"name": "mlp", "hidden": [64]}, {"name": "fedavg", "local_steps": 3}, {"batching": "identical-labels"}),
        ({"name": "lenet"}, {"name": "fedsgd"}, {"update": [{"clip-l2": 1.0}]}),
        ({"name": "cnn"}, {"name": "fedavg", "local_steps": 2}, {}),
    ],
)
def test_a_chunk_on_cuda_equals_the_chunk_on_cpu(
    model: dict[str, object], algorithm: dict[str, object], defence: dict[str, object]
) -> None:
    experiment = _experiment(model, algorithm, defence)
    rng = np.random.default_rng(0)
    images = rng.random((160, 1, 28, 28)).astype(np.float32)
    labels = np.arange(160) % 10
    split = partition(labels, 16, "iid", seed=0)
    clients = np.arange(16)
    task = ChunkTask(0, 0, 0, clients, clients[:0])
    params: dict[str, torch.Tensor] = {}
    sums = []
    for device in DEVICES:
        context = SimulationContext.build(experiment, images, labels, split, 10, device=device)  # type: ignore[arg-type]
        params = params or {name: value.detach().cpu().clone() for name, value in context.model.named_parameters()}
        summary, payload = simulate_chunk(context, params, task)
        assert summary.accepted == 16
        sums.append(payload)
    cpu, gpu = sums[0].weighted_sum, sums[1].weighted_sum
    assert cpu is not None and gpu is not None
    for name in cpu:
        a, b = _array(cpu[name]), _array(gpu[name])
        scale = max(float(np.abs(a).max()), 1e-12)
        assert float(np.abs(a - b).max()) <= RELATIVE * scale, name
