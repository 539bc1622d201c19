"""The figures of ``testbed report``: leakage against batch size, and test accuracy against leakage.

Figures are drawn with matplotlib's Agg backend (no display needed) and saved as PNG files.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from testbed.report.data import GroupResult, LeakageRow, Policy

AVD_AXIS = "mean AVD over audited samples\n(lower = reconstruction closer to the original)"
RECOVERED_AXIS = "recovered fraction of audited samples"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "none"


def _batch_axis(axis: Any, sizes: list[int]) -> None:
    if sizes and max(sizes) >= 4 * min(sizes):
        axis.set_xscale("log", base=2)
    axis.set_xticks(sizes)
    axis.set_xticklabels([str(size) for size in sizes])
    axis.minorticks_off()
    axis.set_xlabel("client batch size")
    axis.grid(True, alpha=0.3)


def _height(entries: int) -> float:
    """Figure height in inches that leaves the plots their size above a two-column legend of ``entries``."""
    return 4.5 + 0.22 * ((entries + 1) // 2)


def _legend_below(figure: Any, axis: Any, title: str) -> None:
    handles, labels = axis.get_legend_handles_labels()
    figure.legend(handles, labels, title=title, loc="outside lower center", ncols=2, fontsize=8, title_fontsize=8)


def plot_leakage_vs_batch(rows: list[LeakageRow], folder: Path) -> list[Path]:
    """One figure per (model, attack) with audited samples: mean AVD and recovered fraction per batch size."""
    plt = _pyplot()
    panels: dict[tuple[str, str], list[LeakageRow]] = defaultdict(list)
    for row in rows:
        if row.samples:
            panels[(row.policy.model, row.policy.attack)].append(row)
    paths = []
    for (model, attack), members in sorted(panels.items()):
        entries = len({row.policy.defence for row in members})
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, _height(entries)), layout="constrained")
        lines: dict[str, list[LeakageRow]] = defaultdict(list)
        for row in members:
            lines[row.policy.label].append(row)
        for label, points in sorted(lines.items()):
            points.sort(key=lambda row: row.policy.batch_size)
            sizes = [row.policy.batch_size for row in points]
            means = [row.avd.mean for row in points]
            stds = [row.avd.std for row in points]
            left.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=label)
            right.plot(sizes, [row.recovered_fraction for row in points], marker="o", label=label)
        sizes = sorted({row.policy.batch_size for row in members})
        for axis in (left, right):
            _batch_axis(axis, sizes)
        left.set_ylabel(AVD_AXIS)
        left.set_title("Reconstruction distance (bars: ± one standard deviation)", fontsize=10)
        right.set_ylabel(RECOVERED_AXIS)
        right.set_ylim(-0.05, 1.05)
        right.set_title("Share of samples the attack recovered", fontsize=10)
        _legend_below(figure, left, "client defence")
        figure.suptitle(f"Leakage against batch size: model {model}, attack {attack}")
        path = folder / f"leakage_vs_batch_{slug(model)}_{slug(attack)}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def _leakage_of(result: GroupResult) -> tuple[float, float]:
    """A group's mean AVD (over finite values) and recovered fraction in one run."""
    finite = result.avd[np.isfinite(result.avd)]
    avd = float(finite.mean()) if finite.size else math.nan
    recovered = float(result.recovered.mean()) if result.recovered.size else math.nan
    return avd, recovered


def _legend_name(policy: Policy, several: bool) -> str:
    return f"{policy.model} / {policy.attack}: {policy.label}" if several else policy.label


def plot_privacy_utility(results: list[GroupResult], folder: Path) -> Path | None:
    """Final test accuracy against leakage, one point per client group of each run, coloured by policy.

    Returns None when no run has both an accuracy and audited samples.
    """
    shown = [result for result in results if result.avd.size and math.isfinite(result.accuracy)]
    if not shown:
        return None
    plt = _pyplot()
    several = len({(result.policy.model, result.policy.attack) for result in shown}) > 1
    names = sorted({_legend_name(result.policy, several) for result in shown})
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    figure, axes = plt.subplots(1, 2, figsize=(11, _height(len(names))), sharey=True, layout="constrained")
    for index, name in enumerate(names):
        colour = colours(index % colours.N)
        mine = [result for result in shown if _legend_name(result.policy, several) == name]
        for position, axis in enumerate(axes):
            xs = [_leakage_of(result)[position] for result in mine]
            ys = [result.accuracy for result in mine]
            axis.scatter(xs, ys, color=colour, label=name, s=40, edgecolors="black", linewidths=0.5)
            for result, x, y in zip(mine, xs, ys, strict=True):
                if math.isfinite(x):
                    axis.annotate(
                        f"B={result.policy.batch_size}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                    )
    axes[0].set_xlabel(AVD_AXIS)
    axes[0].set_ylabel("final test accuracy of the run")
    axes[0].set_title("Privacy (right = less leakage) vs utility", fontsize=10)
    axes[1].set_xlabel(RECOVERED_AXIS)
    axes[1].set_title("Privacy (left = less leakage) vs utility", fontsize=10)
    for axis in axes:
        axis.grid(True, alpha=0.3)
    _legend_below(figure, axes[0], "client defence (points labelled with the batch size B)")
    figure.suptitle("Privacy/utility trade-off: one point per client group of each run")
    path = folder / "privacy_utility.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
