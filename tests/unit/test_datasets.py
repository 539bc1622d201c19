"""Tests of the dataset registry: layouts, offline sources, seeded stratified splits, error messages."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from testbed.data import datasets
from testbed.data.datasets import DATASETS, Dataset, DatasetUnavailable, load_dataset, read_idx, stratified_order


def _check_layout(ds: Dataset, shape: tuple[int, int, int], n_train: int, n_test: int) -> None:
    """Assert the common contract: float32 C-contiguous images in [0, 1], int64 labels, sizes."""
    assert ds.input_shape == shape
    assert ds.train_x.shape == (n_train, *shape) and ds.test_x.shape == (n_test, *shape)
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(np.unique(y)) <= set(range(ds.num_classes))


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write a uint8 array as an IDX file (optionally gzip-compressed)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_mnist_5k_has_5000_images_split_stratified_and_loads_fast() -> None:
    """Parsing the CSV costs 0.1-0.15 s of CPU (measured); a second split of it parses nothing.

    The bound is on this thread's CPU time, not wall time: on a shared or loaded machine wall time also
    counts the other processes' work (measured up to 4 times the CPU time here). That the file is parsed
    once is read from the cache's own counters rather than from a second, faster, timing.
    """
    datasets._mnist_5k.cache_clear()
    start = time.thread_time()
    ds = load_dataset("mnist-5k")
    cold = time.thread_time() - start
    _check_layout(ds, (1, 28, 28), 4000, 1000)
    assert ds.num_classes == 10
    assert np.bincount(ds.train_y).tolist() == [400] * 10
    assert np.bincount(ds.test_y).tolist() == [100] * 10
    assert cold < 2.0
    load_dataset("mnist-5k", seed=1)
    parsed = datasets._mnist_5k.cache_info()
    assert parsed.misses == 1 and parsed.hits >= 1


def test_split_is_seeded_and_disjoint() -> None:
    a, b, c = (load_dataset("mnist-5k", seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.test_x, c.test_x)
    pooled = np.rint(np.concatenate([a.train_x, a.test_x]) * 255).astype(np.uint8).reshape(5000, -1)
    source = datasets._mnist_5k()[0].reshape(5000, -1)
    for got, want in zip(
        np.unique(pooled, axis=0, return_counts=True), np.unique(source, axis=0, return_counts=True), strict=True
    ):
        assert np.array_equal(got, want)


def test_digits_scaled_to_unit_range_with_stratified_split() -> None:
    ds = load_dataset("digits", test_fraction=0.25)
    _check_layout(ds, (1, 8, 8), 1348, 449)
    train_share = np.bincount(ds.train_y) / len(ds.train_y)
    test_share = np.bincount(ds.test_y) / len(ds.test_y)
    assert np.abs(train_share - test_share).max() < 0.01
    assert np.allclose(np.unique(ds.train_x * 16), np.arange(17))


def test_synthetic_is_deterministic_shaped_and_balanced() -> None:
    ds = load_dataset(
        "synthetic", seed=3, synthetic_samples=300, synthetic_shape=(3, 4, 5), num_classes=3, test_fraction=0.5
    )
    _check_layout(ds, (3, 4, 5), 300, 300)
    assert np.bincount(ds.train_y).tolist() == [100, 100, 100]
    assert np.array_equal(
        ds.train_x,
        load_dataset(
            "synthetic", seed=3, synthetic_samples=300, synthetic_shape=(3, 4, 5), num_classes=3, test_fraction=0.5
        ).train_x,
    )
    default = load_dataset("synthetic")
    assert (len(default.train_y), len(default.test_y)) == (2000, 500)
    assert not np.array_equal(default.train_x, load_dataset("synthetic", seed=1).train_x)


def test_synthetic_is_learnable_by_a_linear_model() -> None:
    ds = load_dataset("synthetic", seed=0)

    def features(x: np.ndarray) -> np.ndarray:
        return np.hstack([x.reshape(len(x), -1), np.ones((len(x), 1))])

    X = features(ds.train_x)
    W = np.linalg.solve(X.T @ X + np.eye(X.shape[1]), X.T @ np.eye(10)[ds.train_y])
    accuracy = float(np.mean(np.argmax(features(ds.test_x) @ W, axis=1) == ds.test_y))
    assert 0.8 < accuracy < 0.99


def test_truncation_keeps_class_proportions() -> None:
    ds = load_dataset("mnist-5k", max_train=100, max_test=30, seed=2)
    assert np.bincount(ds.train_y).tolist() == [10] * 10
    assert np.bincount(ds.test_y).tolist() == [3] * 10
    tiny = load_dataset("digits", max_train=7)
    assert len(tiny.train_y) == 7 and len(np.unique(tiny.train_y)) == 7


def test_stratified_order_prefixes_track_class_shares() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    order = stratified_order(labels, np.random.default_rng(0))
    assert np.array_equal(np.sort(order), np.arange(100))
    for m in (7, 25, 50, 93):
        counts = np.bincount(labels[order[:m]], minlength=4)
        assert np.abs(counts - m * np.array([0.1, 0.2, 0.3, 0.4])).max() <= 1.0


@pytest.mark.skipif(
    not all((datasets.FASHION_MNIST_DEBIAN_DIR / f).is_file() for f in datasets._IDX_FILES),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_package() -> None:
    ds = load_dataset("fashion-mnist")
    _check_layout(ds, (1, 28, 28), 60000, 10000)
    assert np.bincount(ds.test_y).tolist() == [1000] * 10
    small = load_dataset("fashion-mnist", max_train=50, max_test=20)
    assert np.bincount(small.train_y).tolist() == [5] * 10 and len(small.test_y) == 20


def test_fashion_mnist_missing_names_both_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(DatasetUnavailable, match=r"apt-get install dataset-fashion-mnist.*download: true"):
        load_dataset("fashion-mnist")
    with pytest.raises(DatasetUnavailable, match=r"not found under root .*set download: true"):
        load_dataset("fashion-mnist", root=str(tmp_path))


def test_mnist_from_a_local_torchvision_root(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
    images["train"][0, 0, 0], images["train"][0, 0, 1] = 0, 255
    labels = {"train": np.arange(12) % 10, "t10k": np.array([3, 1, 4, 1, 5])}
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split], compress=False)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split], compress=False)
    ds = load_dataset("mnist", root=str(tmp_path))
    _check_layout(ds, (1, 28, 28), 12, 5)
    assert np.array_equal(ds.test_y, [3, 1, 4, 1, 5])
    assert np.allclose(ds.train_x[:, 0] * 255, images["train"])


def test_read_idx_round_trips_gzip(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array, compress=True)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_datasets_report_how_to_get_them(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match=rf"'{name}' needs a local copy: set root .* download: true"):
        load_dataset(name)
    with pytest.raises(DatasetUnavailable, match=rf"'{name}' not found under root .*set download: true"):
        load_dataset(name, root=str(tmp_path))


def test_bad_arguments_raise_one_line_errors() -> None:
    with pytest.raises(ValueError, match="allowed: " + ", ".join(DATASETS)) as info:
        load_dataset("imagenet")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"test_fraction: must be in \(0, 1\)"):
        load_dataset("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="max_train: must be a positive integer"):
        load_dataset("digits", max_train=0)
    with pytest.raises(ValueError, match="num_classes: synthetic needs at least 2"):
        load_dataset("synthetic", num_classes=1)
    with pytest.raises(ValueError, match="synthetic_shape: must be three positive ints"):
        load_dataset("synthetic", synthetic_shape=(1, 0, 8))
