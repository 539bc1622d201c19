"""Epsilon against rounds for a DP-SGD client group, as the round loop logs it (privacy/<group>/epsilon).

Usage:
    python benchmarks/dp_epsilon.py [--samples 600] [--batch-size 32] [--noise-multiplier 1.1] [--delta 1e-5]

The group's clients each hold ``--samples`` examples (MNIST's 60,000 over 100 clients by default). Each row
is the epsilon a client that took part in every round has spent after that many rounds, under FedSGD (one
step per round) and FedAvg with one local epoch (``ceil(samples / batch_size)`` steps per round), from
Opacus's RDP and PRV accountants, through the same code the round loop uses.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from testbed.config.schema import Experiment
from testbed.runtime.round_metrics import privacy_metrics, privacy_plan

ROUNDS = (1, 10, 50, 100, 200, 500)


def _experiment(algorithm: dict[str, Any], batch_size: int, dp: dict[str, Any], clients: int) -> Experiment:
    return Experiment.model_validate(
        {
            "name": "dp-epsilon",
            "rounds": max(ROUNDS),
            "algorithm": algorithm,
            "clients": [{"group": "dp", "count": clients, "batch_size": batch_size, "defence": {"dp": dp}}],
        }
    )


def main() -> None:
    """Print the epsilon-versus-rounds table in markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600, help="examples per client")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="expected batch size")
    parser.add_argument("--noise-multiplier", type=float, default=1.1)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    sizes = np.full(args.clients, args.samples, dtype=np.int64)
    settings = [
        ("FedSGD", {"name": "fedsgd"}),
        ("FedAvg, 1 local epoch", {"name": "fedavg", "local_epochs": 1}),
    ]
    columns: list[tuple[str, list[float]]] = []
    steps_per_round: dict[str, int] = {}
    started = time.perf_counter()
    for label, algorithm in settings:
        for accountant in ("rdp", "prv"):
            dp = {"clip": 1.0, "noise_multiplier": args.noise_multiplier, "delta": args.delta, "accountant": accountant}
            plan = privacy_plan(_experiment(algorithm, args.batch_size, dp, args.clients), sizes)
            values = [privacy_metrics(plan, rounds)["privacy/dp/epsilon"] for rounds in ROUNDS]
            steps_per_round[label] = plan[0].regimes[0][1]
            columns.append((f"{label}, {accountant.upper()}", values))
    rate = args.batch_size / args.samples
    print(
        f"epsilon at delta = {args.delta:g} for a client in every round: {args.samples} examples, expected batch "
        f"{args.batch_size} (q = {rate:.4f}), noise multiplier {args.noise_multiplier:g}; steps per round: "
        + ", ".join(f"{label} {steps}" for label, steps in steps_per_round.items())
        + f" ({time.perf_counter() - started:.1f} s)"
    )
    print()
    print("| rounds | " + " | ".join(name for name, _ in columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for row, rounds in enumerate(ROUNDS):
        print(f"| {rounds} | " + " | ".join(f"{values[row]:.3f}" for _, values in columns) + " |")


if __name__ == "__main__":
    main()
