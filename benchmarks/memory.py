"""Memory with many registered clients: 100,000 clients, 1,000 sampled per round.

Usage:
    python benchmarks/memory.py [--clients 100000] [--per-round 1000] [--rounds 3]

The data set is synthetic (two samples per client, 1 x 28 x 28), so the partition is as large as it
gets per client. Prints the bytes of per-client state the engine keeps (the partition's index arrays)
and the peak proportional memory (PSS) of the driver and of all Ray processes together.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import PeakMemory
from testbed.config.topology import validate
from testbed.engine import run_experiment
from testbed.runtime.preparation import prepare_data


def main() -> None:
    """Run the configuration and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--per-round", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"testbed-memory-{os.getpid()}"
    data = {
        "name": "memory",
        "rounds": args.rounds,
        "dataset": {
            "name": "synthetic",
            "synthetic_samples": int(args.clients * 2 / 0.8) + 10,
            "synthetic_shape": [1, 28, 28],
            "max_test": 1000,
        },
        "model": {"name": "mlp", "hidden": [256]},
        "algorithm": {"name": "fedsgd", "lr": 0.05},
        "clients": [{"group": "all", "count": args.clients, "batch_size": 2}],
        "sampling": {"clients_per_round": args.per_round},
        "resources": {"chunk_size": 125},
        "tracking": {
            "uri": f"sqlite:///{workdir / 'memory.db'}",
            "artifact_location": str(workdir / "artifacts"),
            "checkpoints": str(workdir / "checkpoints"),
        },
    }
    workdir.mkdir(parents=True, exist_ok=True)
    experiment = validate(data)
    prepared = prepare_data(experiment)
    state = prepared.partition.indices.nbytes + prepared.partition.offsets.nbytes
    with PeakMemory() as memory:
        result = run_experiment(experiment, show_progress=False)
    seconds = sorted(row["round_seconds"] for row in result.history)
    print(
        "| registered clients | per round | partition bytes per client | s/round (median) | peak PSS driver MiB "
        "| peak PSS all MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.clients:,} | {args.per_round:,} | {state / args.clients:.1f} | {seconds[len(seconds) // 2]:.3f} | "
        f"{memory.peak_driver / 2**20:,.0f} | {memory.peak / 2**20:,.0f} |"
    )


if __name__ == "__main__":
    main()
