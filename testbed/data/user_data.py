"""Data sets from the user's own code: ``dataset: {name: package.module:callable, params: {...}}``.

The callable is called as ``callable(**params)`` (plus ``root=dataset.root`` when a root is set and the
callable takes one) and returns the train and test splits in one of three forms:

- a tuple ``(train_x, train_y, test_x, test_y)`` of arrays (numpy arrays or tensors);
- a mapping with those four entries, optionally ``num_classes``, and any number of key arrays with one
  value per training sample (``train_keys``, or the names ``partition.key`` gives, e.g. a writer id);
- a pair ``(train, test)`` of torch Datasets whose items are ``(image, label)`` or ``(image, label, key)``
  (the keys of the training items become ``train_keys``).

Images are ``(N, C, H, W)`` or ``(N, H, W)`` (one channel is added); uint8 images are divided by 255,
floating-point ones must already lie in [0, 1] (anything else is refused, naming the range found).
Labels are integers from 0; the number of classes is the largest label plus one unless ``num_classes``
says more. ``max_train``/``max_test`` keep a seeded, stratified subset
(the keys follow their samples). Every problem is a one-line ``ImportPathError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from defenses.import_path import ImportPathError, accepts, call, load_callable
from testbed.data.datasets import Dataset, _as_float, _truncate

SPLITS = ("train_x", "train_y", "test_x", "test_y")
DEFAULT_KEY = "train_keys"


def load_user_dataset(
    name: str,
    params: Mapping[str, Any],
    *,
    folder: str | None = None,
    root: str | None = None,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
    """Call the data set callable ``name`` and bring what it returns into the testbed's ``Dataset`` layout."""
    function = load_callable(name, folder)
    kwargs = dict(params)
    if root is not None and "root" not in kwargs and accepts(function, "root"):
        kwargs["root"] = root
    returned = call(name, function, kwargs)
    arrays, keys, declared_classes = _unpack(name, returned)
    train_x, test_x = (_images(name, split, arrays[split]) for split in ("train_x", "test_x"))
    train_y, test_y = (_labels(name, split, arrays[split]) for split in ("train_y", "test_y"))
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if len(images) != len(labels):
            raise ImportPathError(f"{name}: {split}_x holds {len(images)} images but {split}_y {len(labels)} labels")
        if len(images) == 0:
            raise ImportPathError(f"{name}: the {split} split is empty")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ImportPathError(
            f"{name}: test images are {tuple(test_x.shape[1:])}, training images {tuple(train_x.shape[1:])}"
        )
    for key, values in keys.items():
        if len(values) != len(train_y):
            raise ImportPathError(f"{name}: key {key!r} has {len(values)} values for {len(train_y)} training samples")
    num_classes = _num_classes(name, declared_classes, train_y, test_y)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    train = _truncate(np.arange(len(train_y)), train_y, max_train, rng)
    test = _truncate(np.arange(len(test_y)), test_y, max_test, rng)
    return Dataset(
        name,
        np.ascontiguousarray(train_x[train]),
        train_y[train],
        np.ascontiguousarray(test_x[test]),
        test_y[test],
        num_classes,
        keys={key: values[train] for key, values in keys.items()},
    )


def _is_torch_dataset(value: Any) -> bool:
    import torch.utils.data

    return isinstance(value, torch.utils.data.Dataset) and hasattr(value, "__len__")


def _unpack(name: str, returned: Any) -> tuple[dict[str, Any], dict[str, np.ndarray], Any]:
    """The four split arrays, the key arrays and the declared number of classes (or None)."""
    if isinstance(returned, Mapping):
        missing = [split for split in SPLITS if split not in returned]
        if missing:
            raise ImportPathError(f"{name}: the returned mapping lacks {', '.join(missing)}")
        keys = {
            str(key): _key_array(name, str(key), value)
            for key, value in returned.items()
            if key not in SPLITS and key != "num_classes"
        }
        return {split: returned[split] for split in SPLITS}, keys, returned.get("num_classes")
    if isinstance(returned, tuple | list) and len(returned) == 4:
        return dict(zip(SPLITS, returned, strict=True)), {}, None
    if isinstance(returned, tuple | list) and len(returned) == 2 and all(_is_torch_dataset(part) for part in returned):
        train_x, train_y, train_keys = _from_torch(name, "train", returned[0])
        test_x, test_y, _ = _from_torch(name, "test", returned[1])
        keys = {DEFAULT_KEY: train_keys} if train_keys is not None else {}
        return dict(zip(SPLITS, (train_x, train_y, test_x, test_y), strict=True)), keys, None
    raise ImportPathError(
        f"{name}: returned a {type(returned).__name__}; expected (train_x, train_y, test_x, test_y), a mapping "
        "with those entries, or a pair (train, test) of torch Datasets"
    )


def _as_numpy(value: Any) -> np.ndarray:
    """A numpy array of an array, a tensor (detached, on the CPU) or a PIL image (height x width x channels)."""
    if hasattr(value, "detach"):
        return np.asarray(value.detach().cpu().numpy())
    array = np.asarray(value)
    if hasattr(value, "mode") and hasattr(value, "size") and array.ndim == 3:  # a PIL image: channels last
        array = array.transpose(2, 0, 1)
    return array


def _from_torch(name: str, split: str, dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Images, labels and (when every item has a third entry) keys of a torch Dataset, item by item."""
    images, labels, keys = [], [], []
    for position in range(len(dataset)):
        item = dataset[position]
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise ImportPathError(
                f"{name}: {split} item {position} is a {type(item).__name__}; expected (image, label) "
                "or (image, label, key)"
            )
        images.append(_as_numpy(item[0]))
        labels.append(_as_numpy(item[1]).reshape(()))
        if len(item) == 3:
            keys.append(_as_numpy(item[2]).reshape(()))
    if keys and len(keys) != len(images):
        raise ImportPathError(f"{name}: some {split} items carry a key and some do not")
    try:
        stacked = np.stack(images) if images else np.zeros((0, 1, 1, 1), dtype=np.float32)
    except ValueError:
        raise ImportPathError(f"{name}: the {split} images do not all have the same shape") from None
    return stacked, np.array(labels), np.array(keys) if keys else None


def _images(name: str, split: str, value: Any) -> np.ndarray:
    """Float32 (N, C, H, W) images in their given range (uint8 scaled to [0, 1])."""
    array = _as_numpy(value)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ImportPathError(f"{name}: {split} must be images (N, C, H, W) or (N, H, W), got shape {array.shape}")
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ImportPathError(f"{name}: {split} must be uint8 (0-255) or floating point, got {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImportPathError(f"{name}: {split} holds values that are not finite")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ImportPathError(
                f"{name}: floating-point {split} must lie in [0, 1], found values from {low:g} to {high:g} "
                "(divide by 255, or return uint8 images); the leakage scores compare images on [0, 1]"
            )
    return _as_float(array)


def _labels(name: str, split: str, value: Any) -> np.ndarray:
    """Int64 labels from 0."""
    array = _as_numpy(value)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ImportPathError(f"{name}: {split} must be a 1-D array of integer labels, got {array.dtype}{array.shape}")
    labels = array.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise ImportPathError(f"{name}: {split} holds negative labels (classes are numbered from 0)")
    return labels


def _key_array(name: str, key: str, value: Any) -> np.ndarray:
    array = _as_numpy(value)
    if array.ndim != 1:
        raise ImportPathError(f"{name}: key {key!r} must be a 1-D array (one key per training sample)")
    return array


def _num_classes(name: str, declared: Any, train_y: np.ndarray, test_y: np.ndarray) -> int:
    seen = int(max(train_y.max(), test_y.max())) + 1
    if declared is None:
        classes = seen
    elif isinstance(declared, int | np.integer) and not isinstance(declared, bool) and declared >= seen:
        classes = int(declared)
    else:
        raise ImportPathError(
            f"{name}: num_classes {declared!r} must be an integer of at least {seen} (the largest label + 1)"
        )
    if classes < 2:
        raise ImportPathError(f"{name}: the labels hold a single class; classification needs at least two")
    return classes
