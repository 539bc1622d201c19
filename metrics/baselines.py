"""What an attacker knows without the update: no-information baselines, and recovery judged against them.

A reconstruction says something about a client's image only when it beats what the attacker could
have drawn without the update. Three baselines are scored against each original, with the same
metrics as the reconstruction:

- ``blank``: an all-zero image (MNIST's background);
- ``class_mean``: the mean image of the sample's class over a held-out split;
- ``class_random``: one random held-out image of that class.

A sample counts as recovered (``recovered_beyond``) when it passes the usual threshold
(``metrics.recovered``) on a criterion AND beats every baseline on that same criterion: SSIM at or above
the threshold and above every baseline's SSIM, or AVD at or below the threshold and below every
baseline's AVD. See docs/metrics.md for why this matters: AVD is not monotone in information (a blank
image scores about 0.42 on MNIST, a class mean about 0.36, a failed optimisation 1.0-1.7).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from metrics.conventions import METRIC_NAMES
from metrics.paired import pixel_major_finite, scores_of_pairs
from metrics.products import pixel_major
from metrics.recovery import DEFAULT_AVD_THRESHOLD, DEFAULT_SSIM_THRESHOLD, recovered

BASELINES = ("blank", "class_mean", "class_random")
"""The no-information baselines, in the order they are reported."""


class ClassPrototypes:
    """Class means and per-class image pools of a held-out split, for drawing baselines.

    ``images`` is (N, C, H, W) in [0, 1] and ``labels`` (N,) integer classes. Classes absent from the split
    fall back to the mean of the whole split (and a random image of it).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels).astype(np.int64)
        if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"images must be a non-empty (N, C, H, W) array with N labels, got {images.shape}")
        self.images = images
        self.labels = labels
        self.overall = images.mean(axis=0)
        self.means = {int(c): images[labels == c].mean(axis=0) for c in np.unique(labels)}
        self.members = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}

    def draw(self, labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The three baselines for originals of classes ``labels``: name -> (N, C, H, W) array."""
        return self.draw_at(labels, rng.random(len(labels)))

    def draw_at(self, labels: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The three baselines for originals of classes ``labels``, the random class image of sample i being
        the one at ``positions[i]`` (in [0, 1)) along its class's pool: name -> (N, C, H, W) array."""
        labels = np.asarray(labels).astype(np.int64)
        positions = np.asarray(positions, dtype=np.float64)
        shape = (len(labels), *self.overall.shape)
        means = np.stack([self.means.get(int(c), self.overall) for c in labels]) if len(labels) else np.zeros(shape)
        picks = []
        for c, u in zip(labels, positions, strict=True):
            pool = self.members.get(int(c))
            count = len(pool) if pool is not None else len(self.images)
            at = min(int(u * count), count - 1)
            picks.append(int(pool[at]) if pool is not None else at)
        return {
            "blank": np.zeros(shape, dtype=np.float32),
            "class_mean": means.astype(np.float32),
            "class_random": self.images[picks] if picks else np.zeros(shape, dtype=np.float32),
        }


def baseline_scores(originals: np.ndarray, baselines: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Every metric of every baseline against the originals: baseline -> metric -> (N,) array.

    All baselines are scored in one pass (``metrics.paired.scores_of_pairs``): the originals' variation
    maps are formed once, not once per baseline.
    """
    if not baselines:
        return {}
    originals = np.asarray(originals, dtype=np.float64)
    names = list(baselines)
    drawn = np.concatenate([np.asarray(baselines[name], dtype=np.float64) for name in names])
    count = len(originals)
    if drawn.shape != (len(names) * count, *originals.shape[1:]):
        raise ValueError(f"every baseline must have the originals' shape {originals.shape}")
    reconstructions, finite = pixel_major_finite(pixel_major(drawn))
    scores = scores_of_pairs(
        pixel_major(originals), reconstructions, np.tile(np.arange(count), len(names)), np.arange(len(drawn)), finite
    )
    return {
        name: {metric: scores[metric][k * count : (k + 1) * count] for metric in METRIC_NAMES}
        for k, name in enumerate(names)
    }


class BaselineCache:
    """The no-information baselines' scores of training samples, each sample scored once and kept.

    A baseline depends only on the original (its pixels and its class), never on an update, so a sample
    audited in many rounds, or by several attacks, is scored against the baselines once per cache (each of
    a run's scorers holds one). The random held-out image of ``class_random`` is therefore drawn once per
    sample: position ``u_i`` along its class's pool, ``u`` drawn for the whole training set from a
    generator seeded by ``seed``, so every cache draws the same image for a sample.
    """

    def __init__(self, prototypes: ClassPrototypes, train_x: np.ndarray, train_y: np.ndarray, seed: int = 0) -> None:
        self.prototypes = prototypes
        self.train_x = train_x
        self.train_y = train_y
        self.positions = np.random.default_rng([seed, 0xBA5E]).random(len(train_x))
        self.known = np.zeros(len(train_x), dtype=bool)
        self.table = np.zeros((len(train_x), len(BASELINES), len(METRIC_NAMES)))

    def scores(self, indices: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Baseline -> metric -> (len(indices),) scores of the training samples at ``indices`` (as
        ``baseline_scores`` gives for their draws), scoring only the samples not seen before."""
        indices = np.asarray(indices, dtype=np.int64)
        fresh = np.unique(indices[~self.known[indices]])
        if len(fresh):
            drawn = self.prototypes.draw_at(self.train_y[fresh], self.positions[fresh])
            scored = baseline_scores(self.train_x[fresh], drawn)
            for b, name in enumerate(BASELINES):
                for m, metric in enumerate(METRIC_NAMES):
                    self.table[fresh, b, m] = scored[name][metric]
            self.known[fresh] = True
        rows = self.table[indices]
        return {
            name: {metric: rows[:, b, m] for m, metric in enumerate(METRIC_NAMES)} for b, name in enumerate(BASELINES)
        }


def best_baseline(scores: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per sample and metric, the best score any baseline reaches (lowest AVD/MSE, highest PSNR/SSIM)."""
    best: dict[str, np.ndarray] = {}
    for metric in METRIC_NAMES:
        stacked = np.stack([np.asarray(per_metric[metric], dtype=np.float64) for per_metric in scores.values()])
        best[metric] = stacked.max(axis=0) if metric in ("psnr", "ssim") else stacked.min(axis=0)
    return best


def recovered_beyond(
    scores: Mapping[str, np.ndarray],
    baselines: Mapping[str, Mapping[str, np.ndarray]],
    *,
    ssim_threshold: float = DEFAULT_SSIM_THRESHOLD,
    avd_threshold: float = DEFAULT_AVD_THRESHOLD,
) -> np.ndarray:
    """Boolean per sample: recovered by the usual threshold on SSIM or AVD, and beyond every baseline on it."""
    passed = recovered(scores, ssim_threshold=ssim_threshold, avd_threshold=avd_threshold)
    if not baselines:
        return passed
    best = best_baseline(baselines)
    ssim = np.asarray(scores["ssim"], dtype=np.float64)
    avd = np.asarray(scores["avd"], dtype=np.float64)
    by_ssim = (ssim >= ssim_threshold) & (ssim > best["ssim"])
    by_avd = (avd <= avd_threshold) & (avd < best["avd"])
    return passed & (by_ssim | by_avd)
