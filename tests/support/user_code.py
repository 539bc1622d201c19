"""A user's own model, data set and defence files, written into a test's folder (each under a name of its own).

A module imported by one test stays imported in the test process, so every call writes a module with a
fresh name; the import path to use comes back.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

_COUNTER = itertools.count()

BATCHNORM_NET = '''
"""A small convolutional network with batch normalisation, as a user would write it."""

from torch import nn


def small_bn_net(num_classes, input_shape, width=8):
    channels, height, width_px = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, stride=2, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * ((height + 3) // 4) * ((width_px + 3) // 4), num_classes),
    )


class Net(nn.Module):
    """The same idea as a module class with its own forward pass."""

    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def wrong_size(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes + 1))


def not_a_module(num_classes):
    return [num_classes]


def failing(num_classes):
    raise RuntimeError("no weights here")


def cumulative_bn(num_classes):
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, momentum=None), nn.Flatten(), nn.Linear(2 * 26 * 26, num_classes)
    )


NOT_CALLABLE = 3
'''

FOCAL_LOSS = '''
"""A focal loss (Lin et al., 2017) as a user would write it, in a file beside the topology."""

from dataclasses import dataclass

import torch

from defenses import Loss


@dataclass(frozen=True)
class Focal(Loss):
    gamma: float = 2.0

    def per_sample(self, logits, targets):
        log_p = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return -((1.0 - log_p.exp()) ** self.gamma) * log_p
'''


def write_module(folder: Path, source: str, stem: str = "usernet") -> str:
    """Write ``source`` as a new module in ``folder``; return its module name."""
    name = f"{stem}_{os.getpid()}_{next(_COUNTER)}"
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    return name
