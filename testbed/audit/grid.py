"""The audit grid of a round: originals above the matched (worst-case) reconstructions, as a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from testbed.audit.worst_case import WorstCase

GRID_MAX_CLIENTS = 6
GRID_MAX_IMAGES = 8


def render_grid(round_index: int, shown: Sequence[WorstCase], train_x: np.ndarray, *, name_attacks: bool) -> bytes:
    """PNG bytes: per client, its originals (upper row) and the reconstruction matched to each (lower row).

    With ``name_attacks`` (a portfolio), each lower image names the attack that produced it.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = max(min(len(case.client.sample_indices), GRID_MAX_IMAGES) for case in shown)
    figure, axes = plt.subplots(2 * len(shown), columns, figsize=(1.3 * columns + 1, 2.9 * len(shown)), squeeze=False)
    for block, case in enumerate(shown):
        item = case.client
        for column in range(columns):
            top, bottom = axes[2 * block, column], axes[2 * block + 1, column]
            top.axis("off")
            bottom.axis("off")
            if column >= min(len(item.sample_indices), GRID_MAX_IMAGES):
                continue
            top.imshow(_display(train_x[item.sample_indices[column]]), cmap="gray", vmin=0, vmax=1)
            attack = case.chosen[column]
            source = case.by_attack[attack].outcome.reconstruction
            matched = int(item.result.assignment[column])
            if source is not None and matched >= 0:
                bottom.imshow(_display(source.images[matched].detach().cpu().numpy()), cmap="gray", vmin=0, vmax=1)
            title = f"AVD {item.result.scores['avd'][column]:.3f}" + (f"\n{attack}" if name_attacks else "")
            bottom.set_title(title, fontsize=6, y=-0.38 if name_attacks else -0.28)
        axes[2 * block, 0].set_title(f"client {item.outcome.client} ({item.outcome.group})", fontsize=8, loc="left")
    what = "worst-case reconstructions (attack named)" if name_attacks else "matched reconstructions"
    figure.suptitle(f"Round {round_index + 1}: originals (upper) and {what} (lower)", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _display(image: np.ndarray) -> np.ndarray:
    """An image as matplotlib shows it: H x W for one channel, H x W x C otherwise, clipped to [0, 1]."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    array = np.clip(np.abs(array), 0.0, 1.0)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    return array
