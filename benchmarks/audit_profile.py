"""Where the CPU time of an audited client goes, stage by stage and attack by attack, against training it.

One process, one thread (torch's and numpy's BLAS alike, as in the Ray actors), the reference workload
(benchmarks/workload.yaml, FedSGD): per attack a chunk of clients simulated without and with every client
audited, the audited raw updates serialised as Ray would
(pickle protocol 5, buffers out of band), the attack run on them (batched, as the attack actor does), the
reconstructions matched and scored (AVD assignment, four metrics) and the originals scored against the
no-information baselines, as each leakage scorer does: once per sample (metrics.BaselineCache), so
the table gives that stage at a sample's first audit and at a later one. Prints one markdown table of milliseconds per
audited client, each stage also as a multiple of training that client.

ce-demix needs a batch no larger than the number of classes minus one (9 here), so its column trains and
audits batches of 8; the others use the workload's batch of 32. The slow attacks (ce-demix, cocktail-party)
audit fewer clients per chunk (``--slow-clients``); their training reference is the same chunk unaudited.

    python benchmarks/audit_profile.py [--clients 125] [--slow-clients 16] [--repeats 3]
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
from threadpoolctl import threadpool_limits

from metrics import BaselineCache, ClassPrototypes, match_many
from testbed.audit.attack_worker import AttackWorker
from testbed.audit.scoring import MATCH_BLOCK
from testbed.config.load import load_experiment
from testbed.runtime.preparation import initial_params, prepare_data
from testbed.runtime.records import ChunkTask
from testbed.runtime.simulation import SimulationContext, simulate_chunk

WORKLOAD = Path(__file__).resolve().parent / "workload.yaml"
ATTACKS = ("dense-ratio", "ce-demix", "cocktail-party")
STAGES = (
    "train (FedSGD chunk, unaudited)",
    "hand-off: per-client updates formed",
    "serialise (out of band)",
    "deserialise",
    "attack",
    "match and score (AVD assignment, 4 metrics)",
    "baselines, sample's first audit (3 no-information baselines, 4 metrics)",
    "baselines, sample audited before (cached)",
)


def best_of(repeats: int, work: Callable[[], Any]) -> tuple[float, Any]:
    """Fastest wall time of ``repeats`` calls (after one warm-up) and the last result."""
    result = work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times), result


def profile(attack: str, clients_in_chunk: int, repeats: int) -> tuple[int, list[float]]:
    """Batch size and milliseconds per audited client of every stage, for one attack."""
    batch = 8 if attack == "ce-demix" else 32
    experiment = load_experiment(
        WORKLOAD,
        [f"attack.name={attack}", "attack.audit.clients_per_round=1000", f"clients.all.batch_size={batch}"],
    )
    data = prepare_data(experiment)
    dataset = data.dataset
    context = SimulationContext.build(experiment, dataset.train_x, dataset.train_y, data.partition, dataset.num_classes)
    params = initial_params(experiment, dataset)
    clients = np.arange(clients_in_chunk)

    def chunk(audited: np.ndarray) -> Any:
        return simulate_chunk(context, params, ChunkTask(index=0, round=1, group=0, clients=clients, audited=audited))

    plain, _ = best_of(repeats, lambda: chunk(clients[:0]))
    audited, (summary, payload) = best_of(repeats, lambda: chunk(clients))
    buffers: list[pickle.PickleBuffer] = []

    def serialise() -> bytes:
        buffers.clear()
        return pickle.dumps(payload.audited, protocol=5, buffer_callback=buffers.append)

    packed, blob = best_of(repeats, serialise)
    unpacked, _ = best_of(repeats, lambda: pickle.loads(blob, buffers=list(buffers)))
    worker = AttackWorker(experiment, dataset.input_shape, dataset.num_classes)
    attack_repeats = repeats if attack == "dense-ratio" else 1
    attacked, outcomes = best_of(attack_repeats, lambda: worker.audit(params, payload.audited, "root"))
    shape = dataset.input_shape
    originals = [dataset.train_x[summary.ground_truth[o.client]] for o in outcomes if o.reconstruction is not None]
    batches = [
        (original, o.reconstruction.images.numpy().reshape(-1, *shape))
        for original, o in zip(originals, (o for o in outcomes if o.reconstruction is not None), strict=True)
        if o.reconstruction is not None
    ]
    scored, _ = best_of(
        repeats, lambda: [match_many(batches[i : i + MATCH_BLOCK]) for i in range(0, len(batches), MATCH_BLOCK)]
    )
    prototypes = ClassPrototypes(dataset.test_x, dataset.test_y)
    truth = list(summary.ground_truth.values())

    def first_sight() -> BaselineCache:
        cache = BaselineCache(prototypes, dataset.train_x, dataset.train_y)
        for indices in truth:
            cache.scores(indices)
        return cache

    based, cache = best_of(repeats, first_sight)
    cached, _ = best_of(repeats, lambda: [cache.scores(indices) for indices in truth])
    per = 1000.0 / clients_in_chunk
    return batch, [
        plain * per,
        (audited - plain) * per,
        packed * per,
        unpacked * per,
        attacked * per,
        scored * per,
        based * per,
        cached * per,
    ]


def main() -> None:
    """Profile every attack and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=125, help="clients in the chunk (the workload's chunk size)")
    parser.add_argument("--slow-clients", type=int, default=16, help="audited clients for ce-demix, cocktail-party")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    columns = []
    with threadpool_limits(limits=1):  # numpy's BLAS too, as in the Ray actors (OMP_NUM_THREADS=1)
        for attack in args.attacks:
            count = args.clients if attack == "dense-ratio" else args.slow_clients
            batch, stages = profile(attack, count, args.repeats)
            columns.append((f"{attack} (batch {batch}, {count} clients)", stages))
    print(f"One thread, best of {args.repeats} (the slow attacks: one timed run); ms per audited client.")
    print()
    print("| stage | " + " | ".join(f"{name} ms | x training" for name, _ in columns) + " |")
    print("| --- |" + " ---: | ---: |" * len(columns))
    for row, stage in enumerate(STAGES):
        cells = " | ".join(f"{ms[row]:.3f} | {ms[row] / ms[0]:.2f}x" for _, ms in columns)
        print(f"| {stage} | {cells} |")
    for label, skip in (("audit total, sample's first audit", -1), ("audit total, sample audited before", -2)):
        kept = [[v for i, v in enumerate(ms) if i > 0 and i != len(ms) + skip] for _, ms in columns]
        totals = " | ".join(f"{sum(k):.3f} | {sum(k) / ms[0]:.2f}x" for k, (_, ms) in zip(kept, columns, strict=True))
        print(f"| {label} | {totals} |")


if __name__ == "__main__":
    main()
