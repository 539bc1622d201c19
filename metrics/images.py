"""Turning user input (numpy arrays or torch tensors) into validated float64 image arrays.

Every metric works on images of shape H x W or C x H x W with values meant in [0, 1]. Internally an
image is always a float64 numpy array of shape (C, H, W); a batch is (N, C, H, W).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MIN_SIDE = 3
"""The smallest height and width accepted: the second-order AVD map needs at least 3 x 3 pixels."""


def to_float_array(value: Any, name: str) -> np.ndarray:
    """Return ``value`` (array, tensor on any device, or nested sequence) as a float64 numpy array.

    Integer and boolean inputs are rejected because the metrics expect intensities in [0, 1].
    """
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise ValueError(f"{name}: expected floating-point values in [0, 1], got dtype {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise ValueError(f"{name}: expected floating-point values in [0, 1], got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _check_sides(shape: tuple[int, ...], name: str) -> None:
    if shape[-1] < MIN_SIDE or shape[-2] < MIN_SIDE:
        raise ValueError(f"{name}: height and width must be at least {MIN_SIDE}, got shape {shape}")


def as_image(value: Any, name: str) -> np.ndarray:
    """Return one image (H x W or C x H x W) as a float64 array of shape (C, H, W)."""
    array = to_float_array(value, name)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name}: expected an image of shape H x W or C x H x W, got shape {array.shape}")
    _check_sides(array.shape, name)
    return array if array.ndim == 3 else array[np.newaxis]


def as_image_pair(original: Any, reconstruction: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return the original and the reconstruction as (C, H, W) arrays after checking they agree.

    The original is ground truth, so non-finite values in it raise; the reconstruction may hold any
    values (the metrics treat non-finite ones as unrecoverable).
    """
    first = to_float_array(original, "original")
    second = to_float_array(reconstruction, "reconstruction")
    if first.shape != second.shape:
        raise ValueError(
            f"original and reconstruction must have the same shape, got {first.shape} and {second.shape}"
        )
    first = as_image(first, "original")
    check_finite(first, "original")
    return first, as_image(second, "reconstruction")


def as_image_batch(value: Any, name: str) -> np.ndarray:
    """Return a batch of images, (N, H, W) or (N, C, H, W), as a float64 array of shape (N, C, H, W)."""
    array = to_float_array(value, name)
    if array.ndim not in (3, 4):
        raise ValueError(
            f"{name}: expected a batch of shape N x H x W or N x C x H x W, got shape {array.shape}"
        )
    _check_sides(array.shape, name)
    return array if array.ndim == 4 else array[:, np.newaxis]


def as_batch_pair(originals: Any, reconstructions: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return originals (N, C, H, W) and reconstructions (M, C, H, W) after checking they agree.

    Originals must be finite; reconstructions may hold any values.
    """
    first = as_image_batch(originals, "originals")
    check_finite(first, "originals")
    second = as_image_batch(reconstructions, "reconstructions")
    if first.shape[1:] != second.shape[1:]:
        raise ValueError(
            "originals and reconstructions must hold images of the same shape, "
            f"got {first.shape[1:]} and {second.shape[1:]}"
        )
    return first, second


def check_finite(array: np.ndarray, name: str) -> None:
    """Raise a one-line ``ValueError`` if ``array`` holds NaN or infinity."""
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: must hold only finite values (ground truth cannot be NaN or inf)")


def is_finite_image(image: np.ndarray) -> bool:
    """True when every value of the image is finite (the image is recoverable)."""
    return bool(np.isfinite(image).all())


def clip_unit(image: np.ndarray) -> np.ndarray:
    """Clip intensities to [0, 1]."""
    return np.clip(image, 0.0, 1.0)
