"""The audit grid: every original and its matched reconstruction drawn from their own pixels."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from attacks.view import Reconstruction
from metrics import MatchResult
from testbed.audit.grid import CAPTION_LINES, GAP, LINE, captions, render_grid, scale_for
from testbed.audit.outcome import AuditOutcome
from testbed.audit.scoring import ScoredClient
from testbed.audit.worst_case import WorstCase


def _case(train_x: np.ndarray, samples: list[int], client: int, attack: str = "dense-ratio") -> WorstCase:
    images = torch.from_numpy(train_x[samples][::-1].copy())  # returned in reverse order
    outcome = AuditOutcome(client, "g", 0, "root", Reconstruction(images=images, labels=None), attack=attack)
    count = len(samples)
    result = MatchResult(
        assignment=np.arange(count)[::-1].copy(),
        scores={name: np.zeros(count) for name in ("avd", "mse", "psnr", "ssim")},
    )
    scored = ScoredClient(outcome, np.asarray(samples), result, None)
    return WorstCase(scored, [attack] * count, {attack: scored})


def test_each_tile_is_its_images_own_pixels_enlarged() -> None:
    generator = np.random.default_rng(0)
    train_x = (generator.integers(0, 256, size=(20, 1, 28, 28)) / 255.0).astype(np.float32)
    shown = [_case(train_x, [3, 7, 11], client=5), _case(train_x, [1, 2], client=9)]
    grid = Image.open(io.BytesIO(render_grid(0, shown, train_x, portfolio=False))).convert("L")
    scale = scale_for(28, 28)
    side = 28 * scale
    block = LINE + side + GAP + side + CAPTION_LINES * LINE + 2 * GAP
    assert grid.size == (GAP + 3 * (side + GAP), 2 * LINE + 2 * block)
    pixels = np.asarray(grid)
    for position, (samples, case) in enumerate(zip([[3, 7, 11], [1, 2]], shown, strict=True)):
        top = 2 * LINE + position * block + LINE
        for column, sample in enumerate(samples):
            left = GAP + column * (side + GAP)
            expected = np.round(train_x[sample, 0] * 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
            assert np.array_equal(pixels[top : top + side, left : left + side], expected)  # the original
            below = top + side + GAP  # the reconstruction matched to it: the same digit here
            assert np.array_equal(pixels[below : below + side, left : left + side], expected)
        assert case.client.outcome.client in (5, 9)


def test_colour_images_and_named_attacks_draw() -> None:
    generator = np.random.default_rng(1)
    train_x = generator.random((6, 3, 32, 32)).astype(np.float32)
    grid = Image.open(
        io.BytesIO(render_grid(2, [_case(train_x, [0, 4], 1, "inverting-gradients")], train_x, portfolio=True))
    )
    pixels = np.asarray(grid.convert("RGB"))
    scale = scale_for(32, 32)
    top = 2 * LINE + LINE
    expected = np.round(np.transpose(train_x[0], (1, 2, 0)) * 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    assert np.array_equal(pixels[top : top + 32 * scale, GAP : GAP + 32 * scale], expected)


def test_other_channel_counts_and_flat_reconstructions_draw_their_first_channel() -> None:
    generator = np.random.default_rng(2)
    for channels in (2, 4):
        train_x = generator.random((5, channels, 16, 16)).astype(np.float32)
        case = _case(train_x, [0, 3], 1)
        flat = case.client.outcome.reconstruction
        assert flat is not None
        case.client.outcome.reconstruction = Reconstruction(images=flat.images.reshape(2, -1), labels=None)
        grid = np.asarray(Image.open(io.BytesIO(render_grid(0, [case], train_x, portfolio=False))).convert("L"))
        scale, top = scale_for(16, 16), 2 * LINE + LINE
        expected = np.round(train_x[0, 0] * 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
        assert np.array_equal(grid[top : top + 16 * scale, GAP : GAP + 16 * scale], expected)
        below = top + 16 * scale + GAP
        assert np.array_equal(grid[below : below + 16 * scale, GAP : GAP + 16 * scale], expected)


def _portfolio_case(train_x: np.ndarray, ssim: list[float]) -> WorstCase:
    """A worst case over two attacks: dense-ratio kept for the first sample, inverting-gradients for the second."""
    dense = _case(train_x, [0, 1], 3, "dense-ratio")
    inverting = _case(train_x, [0, 1], 3, "inverting-gradients")
    combined = ScoredClient(
        dense.client.outcome,
        np.array([0, 1]),
        MatchResult(
            assignment=np.array([1, 0]),
            scores={"avd": np.array([0.125, np.inf]), "mse": np.zeros(2), "psnr": np.zeros(2), "ssim": np.array(ssim)},
        ),
        None,
    )
    attacks = {"dense-ratio": dense.client, "inverting-gradients": inverting.client}
    return WorstCase(combined, ["dense-ratio", "inverting-gradients"], attacks)


def test_each_tile_names_its_attack_and_its_ssim() -> None:
    train_x = np.random.default_rng(3).random((4, 1, 28, 28)).astype(np.float32)
    case = _portfolio_case(train_x, [0.9125, float("nan")])
    assert captions(case, 0) == ("dense-ratio", "SSIM 0.912", "AVD 0.125")
    assert captions(case, 1) == ("inverting-gradients", "SSIM n/a", "AVD n/a")
    # drawn: a caption differing only in its SSIM changes the SSIM line's pixels and no other
    first = np.asarray(Image.open(io.BytesIO(render_grid(0, [case], train_x, portfolio=True))).convert("L"))
    other = _portfolio_case(train_x, [0.5, float("nan")])
    second = np.asarray(Image.open(io.BytesIO(render_grid(0, [other], train_x, portfolio=True))).convert("L"))
    assert first.shape == second.shape
    side = 28 * scale_for(28, 28)
    text_top = 2 * LINE + LINE + side + GAP + side + 1
    bands = [slice(text_top + line * LINE, text_top + (line + 1) * LINE) for line in range(CAPTION_LINES)]
    assert all((first[band] < 128).any() for band in bands)  # every caption line holds text
    changed = [not np.array_equal(first[band], second[band]) for band in bands]
    assert changed == [False, True, False]
    # the columns widen to the longest caption, so the second tile's attack name does not run into the first
    assert first.shape[1] > GAP + 2 * (side + GAP)
    pitch = (first.shape[1] - GAP) // 2
    attack_line = first[bands[0]]
    assert (attack_line[:, GAP + pitch : GAP + pitch + side] < 128).any()
    assert not (attack_line[:, pitch : GAP + pitch] < 128).any()  # the gap between the columns stays blank
