"""Where the CPU time of an audited client goes, stage by stage, against the time to train it.

One process, one thread, the reference workload (benchmarks/workload.yaml, FedSGD, batch 32) and
dense-ratio: a chunk of clients simulated without and with every client audited, the audited chunk's
raw updates serialised as Ray would (pickle protocol 5, buffers out of band), the attack run on them,
and their reconstructions matched and scored as the leakage meter does. Prints a markdown table of
milliseconds per client.

    python benchmarks/audit_profile.py [--clients 125] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metrics import match_many
from testbed.audit.attack_worker import AttackWorker
from testbed.audit.scoring import MATCH_BLOCK
from testbed.config.load import load_experiment
from testbed.runtime.preparation import initial_params, prepare_data
from testbed.runtime.records import ChunkTask
from testbed.runtime.simulation import SimulationContext, simulate_chunk

WORKLOAD = Path(__file__).resolve().parent / "workload.yaml"


def best_of(repeats: int, work: Callable[[], Any]) -> tuple[float, Any]:
    """Fastest wall time of ``repeats`` calls (after one warm-up) and the last result."""
    result = work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    """Time every stage of auditing one chunk and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=125, help="clients in the chunk (the workload's chunk size)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    experiment = load_experiment(WORKLOAD, ["attack.name=dense-ratio", "attack.audit.clients_per_round=1000"])
    data = prepare_data(experiment)
    dataset = data.dataset
    context = SimulationContext.build(experiment, dataset.train_x, dataset.train_y, data.partition, dataset.num_classes)
    params = initial_params(experiment, dataset)
    clients = np.arange(args.clients)

    def chunk(audited: np.ndarray) -> Any:
        task = ChunkTask(index=0, round=1, group=0, clients=clients, audited=audited)
        return simulate_chunk(context, params, task)

    plain, _ = best_of(args.repeats, lambda: chunk(clients[:0]))
    audited, (summary, payload) = best_of(args.repeats, lambda: chunk(clients))
    buffers: list[pickle.PickleBuffer] = []

    def serialise() -> bytes:
        buffers.clear()
        return pickle.dumps(payload.audited, protocol=5, buffer_callback=buffers.append)

    packed, blob = best_of(args.repeats, serialise)
    unpacked, _ = best_of(args.repeats, lambda: pickle.loads(blob, buffers=list(buffers)))
    worker = AttackWorker(experiment, dataset.train_x.shape[1:], dataset.num_classes)
    attacked, outcomes = best_of(args.repeats, lambda: worker.audit(params, payload.audited, "root"))
    shape = dataset.train_x.shape[1:]
    batches = [
        (dataset.train_x[summary.ground_truth[o.client]], o.reconstruction.images.numpy().reshape(-1, *shape))
        for o in outcomes
        if o.reconstruction is not None
    ]
    scored, _ = best_of(
        args.repeats,
        lambda: [match_many(batches[i : i + MATCH_BLOCK]) for i in range(0, len(batches), MATCH_BLOCK)],
    )
    per = 1000.0 / args.clients
    megabytes = sum(memoryview(b).nbytes for b in buffers) / 2**20 / args.clients
    rows = [
        ("train (fused FedSGD chunk, unaudited)", plain * per),
        ("hand-off: per-client updates formed", (audited - plain) * per),
        (f"serialise ({megabytes:.2f} MiB per update, out of band)", packed * per),
        ("deserialise", unpacked * per),
        ("dense-ratio attack", attacked * per),
        ("match and score (AVD assignment, 4 metrics)", scored * per),
    ]
    train = rows[0][1]
    total = sum(ms for _, ms in rows[1:])
    print(f"One thread, chunk of {args.clients} clients, batch 32, best of {args.repeats}.")
    print()
    print("| stage | ms per client | x training |")
    print("| --- | ---: | ---: |")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {ms / train:.2f}x |")
    print(f"| audit total | {total:.3f} | {total / train:.2f}x |")


if __name__ == "__main__":
    main()
