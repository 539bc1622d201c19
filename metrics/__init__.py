"""Leakage and accuracy metrics for gradient-inversion experiments (numpy, torch, scikit-image only).

Score one reconstruction with ``avd``, ``mse``, ``psnr`` or ``ssim``; pair a batch of originals with
an attack's unordered reconstructions with ``match`` (many batches at once: ``match_many``); decide
which were recovered with ``recovered``; reduce a batch to a few loggable numbers with ``summarize``.
See docs/metrics.md.
"""

from metrics.avd import avd, first_order_map, pairwise_avd, quantize, second_order_map
from metrics.baselines import (
    BASELINES,
    BaselineCache,
    ClassPrototypes,
    baseline_scores,
    best_baseline,
    recovered_beyond,
)
from metrics.classification import accuracy
from metrics.confidence import betting_confidence_sequence
from metrics.conventions import HIGHER_IS_BETTER, METRIC_NAMES, PSNR_CEILING_DB, WORST_SCORE
from metrics.graded import SSIM_LEVELS, GradedLeakage, graded_leakage, ssim_beyond_baselines
from metrics.matching import UNMATCHED, MatchResult, match, match_many
from metrics.recovery import DEFAULT_AVD_THRESHOLD, DEFAULT_SSIM_THRESHOLD, recovered
from metrics.similarity import mse, pairwise_mse, pairwise_psnr, pairwise_ssim, psnr, ssim
from metrics.summary import LeakageSummary, label_accuracy, summarize

__all__ = [
    "BASELINES",
    "DEFAULT_AVD_THRESHOLD",
    "DEFAULT_SSIM_THRESHOLD",
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "PSNR_CEILING_DB",
    "SSIM_LEVELS",
    "UNMATCHED",
    "WORST_SCORE",
    "BaselineCache",
    "ClassPrototypes",
    "GradedLeakage",
    "LeakageSummary",
    "MatchResult",
    "accuracy",
    "avd",
    "baseline_scores",
    "best_baseline",
    "betting_confidence_sequence",
    "first_order_map",
    "graded_leakage",
    "label_accuracy",
    "match",
    "match_many",
    "mse",
    "pairwise_avd",
    "pairwise_mse",
    "pairwise_psnr",
    "pairwise_ssim",
    "psnr",
    "quantize",
    "recovered",
    "recovered_beyond",
    "second_order_map",
    "ssim",
    "ssim_beyond_baselines",
    "summarize",
]
