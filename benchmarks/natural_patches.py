"""A user data module of a different look: grey 28 x 28 patches of natural photographs, one class per photograph.

The images that ship with scikit-image (a camera man, an astronaut, coffee, a cat, a rocket, a horse, coins,
the moon, bricks, grass) are cut into random patches: textures and edges that fill the frame, no dark
background, nothing like digits or garments. It is written as a user writes a data set for the testbed
(``dataset: {name: "benchmarks.natural_patches:patches"}``; docs/data.md) and is what
``benchmarks/attack_datasets.py`` judges the attacks' MNIST-tuned defaults on.
"""

from __future__ import annotations

import numpy as np
import skimage.color
import skimage.data

PHOTOGRAPHS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "horse", "coins", "moon", "brick", "grass")


def _grey(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image, dtype=np.float32) / 255.0


def patches(size: int = 28, train_per_class: int = 300, test_per_class: int = 60, seed: int = 0) -> dict[str, object]:
    """Train and test patches (N, 1, size, size) in [0, 1], labelled by the photograph they come from."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for label, name in enumerate(PHOTOGRAPHS):
        image = _grey(name)
        count = train_per_class + test_per_class
        rows = rng.integers(0, image.shape[0] - size + 1, count)
        cols = rng.integers(0, image.shape[1] - size + 1, count)
        cut = np.stack([image[r : r + size, c : c + size] for r, c in zip(rows, cols, strict=True)])[:, None]
        splits["train_x"].append(cut[:train_per_class])
        splits["test_x"].append(cut[train_per_class:])
        splits["train_y"].append(np.full(train_per_class, label, dtype=np.int64))
        splits["test_y"].append(np.full(test_per_class, label, dtype=np.int64))
    return {key: np.concatenate(parts) for key, parts in splits.items()}
