"""Clients per second of the federation engine against a plain single-process PyTorch loop.

Usage:
    python benchmarks/throughput.py                       # N = 10, 100, 1000, 10000; fedsgd and fedavg
    python benchmarks/throughput.py --clients 1000 --algorithms fedsgd --write docs/benchmarks.md
    python benchmarks/throughput.py --clients 1000 --algorithms fedsgd --no-baseline --audit \
        --audit-attack dense-ratio ce-demix cocktail-party --audit-clients ce-demix=20 cocktail-party=20

Every figure of one invocation is measured on the same machine in the same process tree, so ratios
between engines are meaningful even on a noisy machine. Per configuration: the median of rounds 2-4
(round 1 warms up), evaluation excluded; the fraction of the machine's fp32 matmul ceiling uses the
3 x forward FLOPs rule for a forward plus backward pass. The engine runs benchmarks/workload.yaml with
``resources.chunk_size`` lowered to N / cores where that is smaller, so that N = 10 or 100 still gives
every worker a chunk.

With ``--audit`` each attack of ``--audit-attack`` audits FedSGD rounds (``when_busy: wait``, nothing
skipped; dense-ratio also with ``skip``), and its row gives the ratio to the unaudited round of the same
invocation. ce-demix cannot de-mix more samples than the classes allow (at most C - 1 = 9 for
cross-entropy over ten classes), so it is measured at batch size 8, against an unaudited round at batch
size 8. An audited round's time depends on the audit backlog (``attack.audit.backlog``, two rounds): a
round waits only when the backlog is full, so its rounds alternate between fast ones and ones that wait
for earlier audits, and the last audits are waited for after the last round. An audited row therefore
gives the loop mean: the run's wall time from the start of round 1 to its last records (every round,
the evaluation, logging and checkpoints between them, the final wait; ``RunResult.loop_seconds``) over
its rounds (dense-ratio ``AUDIT_ROUNDS``, the slow attacks four), against the loop mean of an unaudited
run of as many rounds (its own row). ``--audit-clients ATTACK=K``
audits K clients a round instead of all; the row then also gives the
ratio extrapolated to every client (the unaudited round plus N / K times the measured extra time).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.config.topology import apply_overrides, validate
from testbed.data.datasets import load_dataset
from testbed.engine import run_experiment

HERE = Path(__file__).resolve().parent
ROUNDS = 4
AUDIT_ATTACKS = ("dense-ratio", "ce-demix", "cocktail-party")
DEMIX_BATCH = 8
"""Batch size of the ce-demix audit: at most C - 1 samples can be de-mixed through ten classes' logits."""
AUDIT_ROUNDS = 10
"""Rounds of dense-ratio's audited runs (a longer window over the backlog's waits)."""


def matmul_ceiling(threads: int) -> float:
    """Best fp32 GFLOP/s of a large square matmul with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - started) / 1e9)
    return best


def flops_per_client(algorithm: str, batch: int, samples: int) -> float:
    """Forward + backward FLOPs of one client's local work on the MLP 784-256-10."""
    per_sample = 2 * (784 * 256 + 256 * 10)
    used = batch if algorithm == "fedsgd" else samples
    return 3 * per_sample * used


def _pss(process: psutil.Process) -> int:
    try:
        return int(process.memory_full_info().pss)
    except (psutil.Error, AttributeError):
        return 0


def _sample_memory(pid: int, stop: Any, result: Any) -> None:
    """Sampler process: peak PSS of ``pid`` and of all its descendants until ``stop`` is set."""
    os.nice(19)
    root = psutil.Process(pid)
    peak = peak_driver = 0
    while not stop.is_set():
        driver = _pss(root)
        children = [child for child in root.children(recursive=True) if child.pid != os.getpid()]  # not the sampler
        total = driver + sum(_pss(child) for child in children)
        peak, peak_driver = max(peak, total), max(peak_driver, driver)
        stop.wait(0.5)
    result.send((peak, peak_driver))


class PeakMemory:
    """Samples the proportional set size (PSS: shared pages split between their users) of this process and
    of all its descendants (the Ray it started: raylet, GCS, workers), so shared data counts once. The
    sampler is a separate process at the lowest CPU priority, so it neither holds this process's
    interpreter lock nor takes CPU from the run it measures."""

    def __init__(self) -> None:
        self.peak = 0
        self.peak_driver = 0
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_sample_memory, args=(os.getpid(), self._stop, send), daemon=True)

    def __enter__(self) -> PeakMemory:
        self._process.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.peak, self.peak_driver = self._receive.recv()
        self._process.join()


def plain_loop(x: np.ndarray, y: np.ndarray, clients: int, algorithm: str, batch: int, lr: float) -> float:
    """Seconds per round of the same arithmetic in one process: one client after another, plain autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    data_x, data_y = torch.as_tensor(x), torch.as_tensor(y)
    shards = np.array_split(np.random.default_rng(0).permutation(len(y)), clients)
    timings = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        total = [torch.zeros_like(p) for p in model.parameters()]
        for shard in shards:
            local = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
            steps = [shard[:batch]] if algorithm == "fedsgd" else np.array_split(shard, math.ceil(len(shard) / batch))
            for step in steps:
                out = torch.func.functional_call(
                    model,
                    dict(zip([n for n, _ in model.named_parameters()], local, strict=True)),
                    (data_x[step],),
                )
                loss = nn.functional.cross_entropy(out, data_y[step])
                grads = torch.autograd.grad(loss, local)
                if algorithm == "fedsgd":
                    local = list(grads)
                    break
                local = [(p - lr * g).detach().requires_grad_(True) for p, g in zip(local, grads, strict=True)]
            for t, value in zip(total, local, strict=True):
                t += value.detach()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings[1:])


def engine(
    base: dict[str, Any],
    clients: int,
    algorithm: str,
    workdir: Path,
    *,
    batch: int,
    audit: str | None = None,
    attack: str = "dense-ratio",
    audited: int | None = None,
    attack_gpus: float = 0.0,
    rounds: int = ROUNDS,
    loop_mean: bool = False,
) -> tuple[float, float, float]:
    """Seconds per round of the Ray engine, peak memory (PSS) in MiB and the share of clients audited.

    Seconds per round: unaudited, the median of rounds 2-4; audited, the loop mean: the run's rounds with
    everything between them and the wait for the last audits (``RunResult.loop_seconds``) over ``rounds``.
    ``loop_mean`` asks an unaudited run for its loop mean too (the reference of audited rows).

    Memory comes from a separate two-round run of the same configuration, so sampling it does not touch the timing.

    With ``audit`` ("wait" or "skip", ``attack.audit.when_busy``) the root runs ``attack`` on ``audited``
    clients' raw updates (default: every client), every round, with the default backlog of audited rounds;
    ``attack_gpus`` > 0 puts the attack actors on the GPU (that fraction of one each).
    """
    chunk = min(int(base["resources"]["chunk_size"]), math.ceil(clients / (os.cpu_count() or 1)))
    overrides = [
        f"clients.all.count={clients}",
        f"clients.all.batch_size={batch}",
        f"algorithm.name={algorithm}",
        f"resources.chunk_size={chunk}",  # at least one chunk per core, so small federations use every worker
    ]
    if algorithm == "fedavg":
        overrides.append("algorithm.local_epochs=1")
    if audit:
        overrides += [
            f"attack.name={attack}",
            f"attack.audit.clients_per_round={audited or clients}",
            f"attack.audit.when_busy={audit}",
            "resources.attack.num_cpus=0",
            f"resources.attack.num_gpus={attack_gpus}",
        ]
    data = apply_overrides(base, [*overrides, f"rounds={rounds}"])
    data["tracking"] = {
        "uri": f"sqlite:///{workdir / 'bench.db'}",
        "artifact_location": str(workdir / "artifacts"),
        "checkpoints": str(workdir / "checkpoints"),
    }
    result = run_experiment(validate(data), show_progress=False)
    with PeakMemory() as memory:  # a second, shorter run: sampling /proc slows the workers it reads
        run_experiment(validate({**data, "rounds": 2}), show_progress=False)
    later = result.history[1:]
    if audit or loop_mean:
        seconds = result.loop_seconds / rounds
    else:
        seconds = statistics.median(row["round_seconds"] for row in later[:3])
    share = audited or clients
    covered = sum(1 - row.get("audit/skipped_clients", 0.0) / share for row in later) / len(later) if audit else 0.0
    return seconds, memory.peak / 2**20, covered


def audit_runs(
    args: argparse.Namespace, base: dict[str, Any], clients: int, workdir: Path, batch: int
) -> list[tuple[str, tuple[float, float]]]:
    """The audited FedSGD rows: each attack of ``--audit-attack``, labelled with its ratio to the unaudited round."""
    limits = {name: int(count) for name, count in (item.split("=", 1) for item in args.audit_clients)}
    runs: list[tuple[str, tuple[float, float]]] = []
    references: dict[tuple[int, int], float] = {}
    for attack in args.audit_attack:
        attack_batch = min(batch, DEMIX_BATCH) if attack == "ce-demix" else batch
        audited = min(limits.get(attack, clients), clients)
        rounds = AUDIT_ROUNDS if attack == "dense-ratio" else ROUNDS
        if (attack_batch, rounds) not in references:
            reference, memory, _ = engine(
                base, clients, "fedsgd", workdir, batch=attack_batch, rounds=rounds, loop_mean=True
            )
            references[(attack_batch, rounds)] = reference
            runs.append(
                (
                    f"engine (Ray), batch {attack_batch}, unaudited, loop mean of {rounds} rounds (reference)",
                    (reference, memory),
                )
            )
        reference = references[(attack_batch, rounds)]
        for mode in ("wait", "skip") if attack == "dense-ratio" else ("wait",):
            seconds, memory, covered = engine(
                base,
                clients,
                "fedsgd",
                workdir,
                batch=attack_batch,
                audit=mode,
                attack=attack,
                audited=audited,
                attack_gpus=args.attack_gpus,
                rounds=rounds,
            )
            ratio = seconds / reference
            who = "all" if audited == clients else f"{audited:,} of {clients:,}"
            if args.attack_gpus:
                who += f", attack actors on the GPU ({args.attack_gpus:g} each)"
            label = (
                f"engine + {attack} audits {who}, when_busy={mode} ({ratio:.2f}x the reference; {covered:.0%} "
                f"audited; loop mean of {rounds} rounds"
            )
            if audited < clients:
                label += f"; every client: {1 + (ratio - 1) * clients / audited:.1f}x extrapolated"
            runs.append((label + ")", (seconds, memory)))
    return runs


def main() -> None:
    """Run the grid and print (optionally write) the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--algorithms", nargs="+", default=["fedsgd", "fedavg"], choices=["fedsgd", "fedavg"])
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain loop")
    parser.add_argument(
        "--audit", action="store_true", help="also time FedSGD with attacks auditing every client (see --audit-attack)"
    )
    parser.add_argument(
        "--audit-attack", nargs="+", default=["dense-ratio"], choices=AUDIT_ATTACKS, help="the attacks audits run"
    )
    parser.add_argument(
        "--audit-clients",
        nargs="*",
        default=[],
        metavar="ATTACK=K",
        help="audit K clients a round with ATTACK instead of every client (ratios then also extrapolated)",
    )
    parser.add_argument(
        "--attack-gpus",
        type=float,
        default=0.0,
        help="GPU share of each attack actor (resources.attack.num_gpus; 0: attacks on the CPU)",
    )
    parser.add_argument("--write", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    base = yaml.safe_load((HERE / "workload.yaml").read_text(encoding="utf-8"))
    try:
        dataset = load_dataset("fashion-mnist")
        data_note = "Fashion-MNIST train set (60,000 images)"
    except Exception:
        base["dataset"]["name"] = "mnist-5k"
        dataset = load_dataset("mnist-5k")
        data_note = "Fashion-MNIST not installed: MNIST subset (4,000 training images) instead"
    x = dataset.train_x.reshape(len(dataset.train_y), -1)
    threads = os.cpu_count() or 1
    ceiling = matmul_ceiling(threads)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"testbed-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    cells = [
        (algorithm, clients)
        for algorithm in args.algorithms
        for clients in args.clients
        if len(dataset.train_y) // clients >= 1
    ]
    batch = int(base["clients"][0]["batch_size"])
    baselines: dict[tuple[str, int], float] = {}
    if not args.no_baseline:
        # every plain loop runs before the first Ray session: after one, this process's torch threads slow down
        torch.set_num_threads(threads)
        for algorithm, clients in cells:
            cell_batch = min(batch, len(dataset.train_y) // clients)
            baselines[(algorithm, clients)] = plain_loop(x, dataset.train_y, clients, algorithm, cell_batch, 0.05)
    rows = []
    for algorithm, clients in cells:
        samples = len(dataset.train_y) // clients
        cell_batch = min(batch, samples)  # with 10,000 clients a client holds fewer samples than a batch
        flops = flops_per_client(algorithm, cell_batch, samples)
        runs = []
        if (algorithm, clients) in baselines:
            runs.append(("plain loop", (baselines[(algorithm, clients)], float("nan"))))
        seconds, memory, _ = engine(base, clients, algorithm, workdir, batch=cell_batch)
        runs.append(("engine (Ray)", (seconds, memory)))
        if args.audit and algorithm == "fedsgd":
            runs += audit_runs(args, base, clients, workdir, cell_batch)
        baseline = runs[0][1][0]
        for name, (seconds, memory) in runs:
            rate = clients / seconds
            rows.append(
                f"| {clients:,} | {algorithm} | {name} | {seconds:.3f} | {rate:,.0f} | "
                f"{rate * (cell_batch if algorithm == 'fedsgd' else samples):,.0f} | "
                f"{rate * flops / 1e9 / ceiling:.0%} | {baseline / seconds:.2f}x | "
                f"{'' if math.isnan(memory) else f'{memory:,.0f}'} |"
            )
            print(rows[-1], flush=True)
    header = [
        f"Machine: {platform.machine()}, {threads} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"torch {torch.__version__}; fp32 matmul ceiling {ceiling:.0f} GFLOP/s. Data: {data_note}.",
        "",
        "| N | algorithm | engine | s/round | clients/s | samples/s | of ceiling | vs plain loop | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = "\n".join(header + rows)
    print(table)
    if args.write:
        args.write.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
