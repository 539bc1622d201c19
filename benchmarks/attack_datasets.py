"""The attacks' defaults, tuned on MNIST digits, judged on other data sets: mean matched SSIM and recovered share.

Every attack keeps the defaults it was tuned with on the mnist-5k sample (docs/attacks.md) and is run, unchanged,
on Fashion-MNIST (garments: large bright objects), scikit-learn's 8 x 8 digits (64 pixels) and a user data module
of natural-photograph patches (``benchmarks.natural_patches``: textures filling the frame, loaded the way a
user's own data set is). Each cell draws ``--batches`` batches of B training images, random labels or all of
one random class, each on a fresh sigmoid MLP (pixels-256-10, its own seed), computes the honest client's
FedSGD update (the batch-mean cross-entropy gradient), runs the attack on all of the cell's updates at once
(``reconstruct_many``) and pairs reconstructions with originals (``metrics.match`` on SSIM). "Recovered" is
SSIM >= 0.9 or AVD <= 0.02 of the matched pair (the no-information baselines are not subtracted here).

    python benchmarks/attack_datasets.py                              # the table in docs/attacks.md
    python benchmarks/attack_datasets.py --write docs/attacks.md      # and write it there
    python benchmarks/attack_datasets.py --attacks cocktail-party --batch-sizes 8 --datasets fashion-mnist
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import metrics
from attacks import AttackerView, build_attack
from defenses import CrossEntropy
from testbed.data.datasets import load_dataset
from testbed.data.user_data import load_user_dataset

DATASETS = ("mnist-5k", "fashion-mnist", "digits", "benchmarks.natural_patches:patches")
BATCH_SIZES = {
    "cocktail-party": (4, 8, 16),
    "dense-ratio": (1, 4, 8),
    "ce-demix": (4, 8),
    "inverting-gradients": (1, 2),
}
START, END = "<!-- attack-datasets:start -->", "<!-- attack-datasets:end -->"


def training_images(name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The training split (N, C, H, W) in [0, 1] and its labels, or None where the data set is not installed."""
    try:
        if ":" in name:
            data = load_user_dataset(name, {}, folder=str(Path(__file__).resolve().parent.parent))
        else:
            data = load_dataset(name, max_train=5000)
    except (ValueError, OSError) as error:
        print(f"{name}: skipped ({str(error).splitlines()[0]})", file=sys.stderr)
        return None
    return data.train_x, data.train_y


def sigmoid_mlp(pixels: int, seed: int) -> torch.nn.Module:
    """A fresh MLP pixels-256-10 with sigmoid activations (torch's default initialisation, drawn from ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(pixels, 256), torch.nn.Sigmoid(), torch.nn.Linear(256, 10)
        )


def client_view(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> AttackerView:
    """The server's view of an honest FedSGD client: the batch-mean cross-entropy gradient."""
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    working = {name: value.clone().requires_grad_(True) for name, value in params.items()}
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, working, (images,)), labels)
    grads = torch.autograd.grad(loss, list(working.values()))
    return AttackerView(
        model=model,
        global_params=params,
        update={name: g.detach() for name, g in zip(working, grads, strict=True)},
        kind="gradient",
        batch_size=len(images),
        num_samples=len(images),
        local_steps=1,
        lr=0.1,
        loss=CrossEntropy(),
        input_shape=tuple(images.shape[1:]),
        num_classes=10,
    )


def cell(
    attack: str, images: np.ndarray, labels: np.ndarray, size: int, mode: str, batches: int, seed: int
) -> tuple[float, float, float]:
    """Mean matched SSIM, recovered share and seconds per update of one (attack, data set, B, labels) cell."""
    rng = np.random.default_rng([seed, size, 0 if mode == "random" else 1])
    views, originals = [], []
    pixels = int(np.prod(images.shape[1:]))
    for _ in range(batches):
        pool = np.arange(len(labels)) if mode == "random" else np.flatnonzero(labels == rng.integers(10))
        picked = rng.choice(pool, size, replace=False)
        batch = torch.from_numpy(images[picked])
        views.append(
            client_view(sigmoid_mlp(pixels, int(rng.integers(2**31))), batch, torch.from_numpy(labels[picked]))
        )
        originals.append(batch)
    start = time.perf_counter()
    results = build_attack(attack).reconstruct_many(views)
    seconds = (time.perf_counter() - start) / len(views)
    ssim, passed = [], []
    for batch, result in zip(originals, results, strict=True):
        scores = metrics.match(batch, result.images, metric="ssim").scores
        ssim.append(np.asarray(scores["ssim"]))
        passed.append(metrics.recovered(scores))
    return float(np.concatenate(ssim).mean()), float(np.concatenate(passed).mean()), seconds


def table(args: argparse.Namespace) -> list[str]:
    """The markdown rows, printed as they come."""
    lines = [
        "| attack | data set | B | labels | batches | mean matched SSIM | recovered | seconds per update |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    loaded = {name: training_images(name) for name in args.datasets}
    for attack in args.attacks:
        for name, data in loaded.items():
            if data is None:
                continue
            for size in args.batch_sizes or BATCH_SIZES[attack]:
                for mode in ("random", "identical"):
                    mean, share, seconds = cell(attack, data[0], data[1], size, mode, args.batches, args.seed)
                    shown = name.split(":")[0].removeprefix("benchmarks.")
                    row = (
                        f"| {attack} | {shown} | {size} | {mode} | {args.batches} | {mean:.3f} | {share:.2f} "
                        f"| {seconds:.2f} |"
                    )
                    print(row, flush=True)
                    lines.append(row)
    return lines


def write(path: Path, lines: Sequence[str], command: str) -> None:
    """Replace the generated block of ``path`` (between the start and end markers) with the table."""
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} ... {END} block to replace")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join([START, f"Generated {stamp} by `{command}` (one torch thread):", "", *lines, END])
    path.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S), "utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=list(BATCH_SIZES), default=list(BATCH_SIZES))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: per attack")
    parser.add_argument("--batches", type=int, default=4, help="batches (updates) per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None, help="replace the generated table in this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = table(args)
    if args.write is not None:
        command = "python benchmarks/attack_datasets.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write(args.write, lines, command.strip())


if __name__ == "__main__":
    main()
