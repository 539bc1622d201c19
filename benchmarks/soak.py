"""Soak run: many rounds with faults, watching the memory of the driver and of the client workers.

Usage:
    python benchmarks/soak.py                     # 200 rounds, 1,000 clients, a worker SIGKILLed every 50 rounds
    python benchmarks/soak.py --rounds 60 --kill-every 20

The run is a real ``python -m testbed run`` process (its own local Ray) with every kind of fault the
engine handles: dropouts, stragglers past the round deadline, clients sending NaN updates, and a
client worker process SIGKILLed mid-round every ``--kill-every`` rounds. This process only watches:
every 0.2 s it reads the resident set size (RSS) of the driver, of each ``ClientWorker`` and of the
aggregator, and attributes it to the round in progress (the checkpoint tells which). It prints a
markdown table of the peak RSS over the first ten rounds and over the last ten, and the growth.

The bound the engine is expected to hold: less than 10% growth of the driver and of the largest
worker from the first ten rounds to the last ten. The exit status is 1 when a bound is exceeded,
when the run fails, or when a count does not add up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.tracking.checkpoint import load_checkpoint

WINDOW = 10
BOUND = 0.10
SAMPLE_S = 0.2
MIB = 2**20


def topology(folder: Path, rounds: int, clients: int) -> dict[str, Any]:
    """1,000 clients in three groups: steady (10% dropout), flaky (20% dropout, stragglers), broken (NaN)."""
    steady, flaky = clients * 6 // 10, clients * 3 // 10
    return {
        "name": "soak",
        "seed": 0,
        "rounds": rounds,
        "dataset": {"name": "mnist-5k", "partition": {"scheme": "iid"}},
        "model": {"name": "mlp", "hidden": [256], "activation": "relu"},
        "algorithm": {"name": "fedsgd", "lr": 0.1},
        "clients": [
            {"group": "steady", "count": steady, "batch_size": 4, "dropout": 0.1},
            {"group": "flaky", "count": flaky, "batch_size": 4, "dropout": 0.2, "straggler_delay_s": 1.0},
            {
                "group": "broken",
                "count": clients - steady - flaky,
                "batch_size": 4,
                "faults": {"fraction": 0.2, "kind": "nan"},
            },
        ],
        "sampling": {"round_timeout_s": 2.0},
        "evaluation": {"every": 10},
        "resources": {"chunk_size": 125},
        "tracking": {
            "uri": f"sqlite:///{folder / 'soak.db'}",
            "experiment": "soak",
            "artifact_location": str(folder / "artifacts"),
            "checkpoints": str(folder / "checkpoints"),
        },
    }


@dataclass
class Watch:
    """Peak RSS per round of the driver, of each worker process and of the aggregator."""

    driver: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    workers: dict[int, dict[int, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    aggregator: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def sample(self, round_in_progress: int, driver: psutil.Process) -> list[psutil.Process]:
        """Record one sample; return the client worker processes seen."""
        self.driver[round_in_progress] = max(self.driver[round_in_progress], _rss(driver))
        workers = []
        for process in _descendants(driver):
            title = _title(process)
            if title.startswith("ray::ClientWorker"):
                workers.append(process)
                here = self.workers[round_in_progress]
                here[process.pid] = max(here[process.pid], _rss(process))
            elif title.startswith("ray::Aggregator"):
                self.aggregator[round_in_progress] = max(self.aggregator[round_in_progress], _rss(process))
        return workers


def _rss(process: psutil.Process) -> int:
    try:
        return int(process.memory_info().rss)
    except psutil.Error:
        return 0


def _title(process: psutil.Process) -> str:
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return ""
    return cmdline[0] if cmdline else ""


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _checkpointed_round(folder: Path, seen: dict[str, Any]) -> int:
    """The last checkpointed round, re-read only when the checkpoint file was replaced."""
    files = list((folder / "checkpoints").glob("*/state.pt"))
    if not files:
        return 0
    try:
        identity = (files[0].stat().st_ino, files[0].stat().st_mtime_ns)
        if identity != seen.get("identity"):
            seen["round"] = int(load_checkpoint(files[0])["round"])
            seen["identity"] = identity
    except (OSError, RuntimeError, EOFError):
        pass
    return int(seen.get("round", 0))


def soak(rounds: int, clients: int, kill_every: int, folder: Path) -> dict[str, Any]:
    """Run the soak; return the watch, the kills, the run's history and its wall time."""
    file = folder / "soak.yaml"
    file.write_text(yaml.safe_dump(topology(folder, rounds, clients), sort_keys=False), encoding="utf-8")
    log = open(folder / "driver.log", "w", encoding="utf-8")
    started = time.monotonic()
    driver_process = subprocess.Popen(
        [sys.executable, "-m", "testbed", "run", str(file), "--quiet"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    driver = psutil.Process(driver_process.pid)
    watch = Watch()
    kills: list[tuple[int, int]] = []
    seen: dict[str, Any] = {}
    next_kill = kill_every
    reported = 0
    try:
        while driver_process.poll() is None:
            done = _checkpointed_round(folder, seen)
            workers = watch.sample(done + 1, driver)
            if kill_every and done >= next_kill and done < rounds:
                busy = [worker for worker in workers if _title(worker).startswith("ray::ClientWorker.run")]
                if busy:
                    os.kill(busy[0].pid, signal.SIGKILL)
                    kills.append((done + 1, busy[0].pid))
                    next_kill += kill_every
            if done >= reported + 10:
                reported = done
                print(f"round {done}/{rounds}  {time.monotonic() - started:6.0f} s", file=sys.stderr, flush=True)
            time.sleep(SAMPLE_S)
    finally:
        if driver_process.poll() is None:
            os.killpg(driver_process.pid, signal.SIGKILL)
        stdout = driver_process.communicate()[0]
        log.close()
    seconds = time.monotonic() - started
    if driver_process.returncode != 0:
        tail = (folder / "driver.log").read_text(encoding="utf-8")[-3000:]
        raise SystemExit(f"the soak run failed with status {driver_process.returncode}:\n{tail}")
    run_id = json.loads(stdout.strip().splitlines()[-1])["run_id"]
    state = load_checkpoint(folder / "checkpoints" / run_id / "state.pt")
    return {"watch": watch, "kills": kills, "history": state["history"], "seconds": seconds, "run_id": run_id}


def _window(values: dict[int, int], rounds: range) -> int:
    return max((values.get(r, 0) for r in rounds), default=0)


def _largest_worker(watch: Watch, rounds: range) -> int:
    """Peak RSS of the largest client worker within ``rounds``."""
    return max((max(per.values(), default=0) for r, per in watch.workers.items() if r in rounds), default=0)


def report(outcome: dict[str, Any], rounds: int, clients: int) -> tuple[str, bool]:
    """The markdown report and whether every bound and count holds."""
    watch: Watch = outcome["watch"]
    history: list[dict[str, float]] = outcome["history"]
    first, last = range(1, WINDOW + 1), range(rounds - WINDOW + 1, rounds + 1)
    rows = [
        ("driver", _window(watch.driver, first), _window(watch.driver, last), True),
        ("largest client worker", _largest_worker(watch, first), _largest_worker(watch, last), True),
        ("aggregator", _window(watch.aggregator, first), _window(watch.aggregator, last), False),
    ]
    ok = True
    lines = [
        f"| process | peak RSS, rounds 1-{WINDOW} (MiB) | peak RSS, rounds {last.start}-{rounds} (MiB) | growth |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, start, end, bounded in rows:
        growth = end / start - 1 if start else float("nan")
        flag = ""
        if bounded and not growth < BOUND:
            ok, flag = False, " (over the bound)"
        lines.append(f"| {name} | {start / MIB:.0f} | {end / MIB:.0f} | {growth:+.1%}{flag} |")
    totals = {
        key: int(sum(row[key] for row in history)) for key in ("sampled", "accepted", "dropped", "late", "rejected")
    }
    balanced = all(
        row["sampled"] == row["accepted"] + row["dropped"] + row["late"] + row["rejected"] for row in history
    )
    ok = ok and balanced and len(history) == rounds
    replaced = int(history[-1]["workers_replaced"]) if history else 0
    ok = ok and replaced >= len(outcome["kills"])
    accuracy = [row["test_accuracy"] for row in history if "test_accuracy" in row]
    block = max(1, rounds // 10)
    blocks = [range(start, min(start + block, rounds + 1)) for start in range(1, rounds + 1, block)]
    driver_trend = ", ".join(f"{_window(watch.driver, b) / MIB:.0f}" for b in blocks)
    worker_trend = ", ".join(f"{_largest_worker(watch, b) / MIB:.0f}" for b in blocks)
    lines += [
        "",
        f"Peak RSS (MiB) per block of {block} rounds: driver {driver_trend}; largest client worker {worker_trend}.",
        "",
        f"{rounds} rounds, {clients} clients (all sampled every round), {len(outcome['kills'])} client workers "
        f"SIGKILLed mid-round (rounds {', '.join(str(r) for r, _ in outcome['kills']) or 'none'}), "
        f"{replaced} replaced; over the run: {totals['sampled']} updates sampled, {totals['accepted']} accepted, "
        f"{totals['dropped']} dropped, {totals['late']} late, {totals['rejected']} rejected (NaN); "
        f"sampled = accepted + dropped + late + rejected in every round: {'yes' if balanced else 'NO'}; "
        f"final test accuracy {accuracy[-1] if accuracy else float('nan'):.3f}; "
        f"{outcome['seconds']:.0f} s in all ({outcome['seconds'] / rounds:.2f} s per round).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}. Bound: growth below {BOUND:.0%} for the driver and the largest worker: "
        f"{'held' if ok else 'NOT held'}.",
    ]
    return "\n".join(lines), ok


def main() -> None:
    """Run the soak and print its markdown report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument(
        "--kill-every", type=int, default=50, help="SIGKILL a busy client worker every N rounds (0: never)"
    )
    parser.add_argument("--keep", type=Path, help="keep the run's files in this folder (default: a temporary one)")
    args = parser.parse_args()
    if args.rounds < 2 * WINDOW:
        parser.error(f"--rounds must be at least {2 * WINDOW}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        outcome = soak(args.rounds, args.clients, args.kill_every, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="testbed-soak-") as folder:
            outcome = soak(args.rounds, args.clients, args.kill_every, Path(folder))
    text, ok = report(outcome, args.rounds, args.clients)
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
