"""Classification accuracy of a model's outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_label_array(value: Any, name: str) -> np.ndarray:
    """Return integer class labels (array, tensor or sequence) as a 1-D int64 numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of class labels, got shape {array.shape}")
    if array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and not np.all(array == np.round(array))):
        raise ValueError(f"{name}: expected integer class labels, got dtype {array.dtype}")
    return array.astype(np.int64)


def accuracy(logits_or_predictions: Any, labels: Any) -> float:
    """Fraction of samples whose predicted class equals the label.

    ``logits_or_predictions`` is either logits of shape (N, C), whose arg-max is the prediction, or
    predicted classes of shape (N,); ``labels`` has shape (N,). Arrays or tensors.
    """
    truth = as_label_array(labels, "labels")
    outputs = logits_or_predictions
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.detach().cpu().numpy()
    outputs = np.asarray(outputs)
    if outputs.ndim == 2:
        predictions = outputs.argmax(axis=1)
    elif outputs.ndim == 1:
        predictions = as_label_array(outputs, "logits_or_predictions")
    else:
        raise ValueError(
            f"logits_or_predictions: expected logits (N, C) or predictions (N,), got shape {outputs.shape}"
        )
    if len(predictions) != len(truth):
        raise ValueError(
            f"logits_or_predictions and labels must hold the same number of samples, "
            f"got {len(predictions)} and {len(truth)}"
        )
    if len(truth) == 0:
        raise ValueError("labels: need at least one sample to compute an accuracy")
    return float(np.mean(predictions == truth))
