"""The pool of ``ClientWorker`` actors: each simulates many virtual clients, chunk by chunk.

The training arrays and the partition reach every worker once, through the object store. A round is a
list of chunk tasks handed out dynamically (a few in flight per worker); a chunk whose worker dies is
run again on a fresh worker, so no client update is lost or counted twice. A chunk whose worker dies
more than ``MAX_CHUNK_RETRIES`` times stops the run (``RunAborted``) naming the chunk and the last error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, WorkerCrashedError

from testbed.config.schema import Experiment
from testbed.data.partition import Partition
from testbed.errors import RunAborted
from testbed.runtime.records import ChunkPayload, ChunkSummary, ChunkTask, ClientUpdate, Params
from testbed.runtime.simulation import SimulationContext, simulate_chunk

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2
MAX_CHUNK_RETRIES = 3
"""Times one chunk is run again after its worker died; one more death stops the run."""


class ClientWorker:
    """Hosts the model, the data and the defence policies; simulates chunks of clients on request."""

    def __init__(self, experiment: Experiment, data: dict[str, Any], partition: Partition, num_classes: int) -> None:
        threads = max(1, int(experiment.resources.client.num_cpus))
        torch.set_num_threads(threads)
        device = "cpu"
        if experiment.resources.client.num_gpus > 0:
            if not torch.cuda.is_available():
                raise RuntimeError("resources.client.num_gpus > 0 but this worker sees no CUDA device")
            device = "cuda"
        self.context = SimulationContext.build(experiment, data["x"], data["y"], partition, num_classes, device=device)

    def pid(self) -> int:
        """The worker's process id (for diagnostics and fault-injection tests)."""
        return os.getpid()

    def node(self) -> str:
        """The Ray node id this worker runs on."""
        return str(ray.get_runtime_context().get_node_id())

    def run(self, params: Params, task: ChunkTask) -> tuple[ChunkSummary, ChunkPayload, list[ClientUpdate]]:
        """Simulate one chunk of clients: its counts, its payload, and its audited clients' raw updates.

        The raw updates are a separate object, so the aggregator can hand them to its attack actors by
        reference without fetching them; the payload keeps their metadata only.
        """
        summary, payload = simulate_chunk(self.context, params, task)
        audited = payload.audited
        payload.audited = [dataclasses.replace(update, update={}, factors={}) for update in audited]
        return summary, payload, audited


class WorkerPool:
    """A fixed number of ClientWorker actors with dynamic dispatch and replacement of dead workers."""

    def __init__(
        self,
        experiment: Experiment,
        data_ref: ray.ObjectRef,
        partition_ref: ray.ObjectRef,
        num_classes: int,
        size: int,
    ) -> None:
        client = experiment.resources.client
        self._actor_class = ray.remote(num_cpus=client.num_cpus, num_gpus=client.num_gpus, max_restarts=0)(ClientWorker)
        self._make: Callable[[], Any] = lambda: self._actor_class.remote(
            experiment, data_ref, partition_ref, num_classes
        )
        self.workers: list[Any] = [self._make() for _ in range(size)]
        self.replaced = 0
        ray.get([worker.pid.remote() for worker in self.workers])

    def nodes(self) -> list[str]:
        """Node id of each worker."""
        return [str(node) for node in ray.get([worker.node.remote() for worker in self.workers])]

    def run_round(
        self,
        params_ref: ray.ObjectRef,
        tasks: Sequence[ChunkTask],
        on_done: Callable[[ChunkSummary], None] | None = None,
    ) -> tuple[list[ChunkSummary], list[ray.ObjectRef], list[ray.ObjectRef]]:
        """Run every task; return the summaries, payload references and audited-update references.

        All three are in task index order; the last holds only chunks with audited clients.
        """
        pending = deque(tasks)
        running: dict[ray.ObjectRef, tuple[int, ChunkTask, tuple[ray.ObjectRef, ray.ObjectRef]]] = {}
        summaries: dict[int, ChunkSummary] = {}
        payloads: dict[int, tuple[ray.ObjectRef, ray.ObjectRef]] = {}
        deaths: dict[int, int] = {}  # chunk index -> times its worker died running it

        def submit(slot: int) -> None:
            task = pending.popleft()
            summary_ref, payload_ref, audit_ref = self.workers[slot].run.options(num_returns=3).remote(params_ref, task)
            running[summary_ref] = (slot, task, (payload_ref, audit_ref))

        for _ in range(IN_FLIGHT_PER_WORKER):
            for slot in range(len(self.workers)):
                if pending:
                    submit(slot)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            slot, task, payload_and_audit = running.pop(ready[0])
            try:
                summary: ChunkSummary = ray.get(ready[0])
            except (RayActorError, WorkerCrashedError) as exc:
                deaths[task.index] = deaths.get(task.index, 0) + 1
                if deaths[task.index] > MAX_CHUNK_RETRIES:
                    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
                    raise RunAborted(
                        f"round {task.round + 1}: chunk {task.index} ({len(task.clients)} clients) killed its worker "
                        f"{deaths[task.index]} times "
                        f"(it is retried at most {MAX_CHUNK_RETRIES} times); last error: {detail}"
                    ) from None
                log.warning("client worker %d died; re-running chunk %d on a new worker", slot, task.index)
                self._replace(slot, running, pending)
                pending.appendleft(task)
                submit(slot)
                continue
            summaries[task.index] = summary
            payloads[task.index] = payload_and_audit
            if on_done is not None:
                on_done(summary)
            if pending:
                submit(slot)
        order = sorted(summaries)
        audited = [payloads[i][1] for i in order if summaries[i].ground_truth]
        return [summaries[i] for i in order], [payloads[i][0] for i in order], audited

    def _replace(
        self,
        slot: int,
        running: dict[ray.ObjectRef, tuple[int, ChunkTask, tuple[ray.ObjectRef, ray.ObjectRef]]],
        pending: deque[ChunkTask],
    ) -> None:
        """Start a new worker in ``slot``; the dead worker's other in-flight tasks go back to the queue."""
        for ref, (other_slot, task, _) in list(running.items()):
            if other_slot == slot:
                del running[ref]
                pending.appendleft(task)
        self.workers[slot] = self._make()
        self.replaced += 1

    def shutdown(self) -> None:
        """Stop every worker."""
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
