"""Vectorised pair scores equal the one-pair metric functions."""

from __future__ import annotations

import numpy as np
import pytest

from metrics import avd, mse, psnr, ssim
from metrics.paired import PAIRED

ONE_PAIR = {"avd": avd, "mse": mse, "psnr": psnr, "ssim": ssim}


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 8, 8), (1, 5, 6)])
@pytest.mark.parametrize("metric", sorted(ONE_PAIR))
def test_paired_scores_equal_the_one_pair_functions(metric: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(4)
    originals = rng.random((6, *shape))
    reconstructions = originals + rng.normal(0.0, 0.2, size=originals.shape)  # outside [0, 1] too
    reconstructions[1] = originals[1]  # an exact copy: PSNR at its ceiling, SSIM 1, AVD 0
    reconstructions[2, 0, 0, 0] = np.nan  # unrecoverable
    expected = np.array([ONE_PAIR[metric](a, b) for a, b in zip(originals, reconstructions, strict=True)])
    got = PAIRED[metric](originals, reconstructions)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert len(set(np.round(got, 6))) >= 4  # the pairs really differ
