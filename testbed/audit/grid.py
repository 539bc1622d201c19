"""The audit grid of a round: originals above the matched (worst-case) reconstructions, as a PNG.

Under each reconstruction, the attack that produced it, its SSIM and its AVD (``captions``), so a reader
can set what the eye sees against the numbers.

Drawn with Pillow straight from the pixel arrays (each image enlarged by a whole factor, nearest
neighbour, so a tile shows the image's own pixels): a grid is logged every audited round, and the
driver that draws it is also the process that runs the round loop.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from testbed.audit.worst_case import WorstCase

GRID_MAX_CLIENTS = 6
GRID_MAX_IMAGES = 8
TILE = 84
"""Target side of a tile in pixels (28 x 28 images are shown three times enlarged)."""
GAP = 6
"""Pixels between tiles."""
LINE = 12
"""Height of one line of text."""


def scale_for(height: int, width: int) -> int:
    """The whole enlargement factor that brings an image's longer side nearest to ``TILE`` (at least 1)."""
    return max(1, round(TILE / max(height, width)))


def tile(image: np.ndarray, scale: int) -> Image.Image:
    """An image (H x W, or C x H x W with 1 or 3 channels) as an RGB tile, enlarged ``scale`` times."""
    array = display(image)
    pixels = np.round(array * 255.0).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def captions(case: WorstCase, column: int) -> tuple[str, str, str]:
    """The lines under a reconstruction's tile: the attack that produced it, its SSIM and its AVD."""
    scores = case.client.result.scores
    return case.chosen[column], f"SSIM {_number(scores['ssim'][column])}", f"AVD {_number(scores['avd'][column])}"


def _number(value: float) -> str:
    return f"{float(value):.3f}" if np.isfinite(value) else "n/a"


CAPTION_LINES = 3
"""Lines of text under each reconstruction (``captions``)."""


def render_grid(round_index: int, shown: Sequence[WorstCase], train_x: np.ndarray, *, portfolio: bool) -> bytes:
    """PNG bytes: per client, its originals (upper row) and the reconstruction matched to each (lower row).

    Under each reconstruction its ``captions``: the attack, SSIM and AVD. Columns are as wide as the widest
    tile or caption. ``portfolio`` says in the title that the reconstructions are a worst case over attacks.
    """
    height, width = train_x.shape[-2], train_x.shape[-1]
    scale = scale_for(height, width)
    side_y, side_x = height * scale, width * scale
    counts = [min(len(case.client.sample_indices), GRID_MAX_IMAGES) for case in shown]
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [[captions(case, column) for column in range(count)] for case, count in zip(shown, counts, strict=True)]
    widest = max(
        (measure.textlength(text, font=font) for row in lines for tile_lines in row for text in tile_lines), default=0.0
    )
    pitch = max(side_x, int(np.ceil(widest))) + GAP
    block = LINE + side_y + GAP + side_y + CAPTION_LINES * LINE + 2 * GAP
    canvas = Image.new("RGB", (GAP + max(counts) * pitch, 2 * LINE + len(shown) * block), "white")
    draw = ImageDraw.Draw(canvas)
    what = "worst-case reconstructions over the attacks" if portfolio else "matched reconstructions"
    draw.text((GAP, 2), f"Round {round_index + 1}: originals (upper) and {what} (lower)", fill="black", font=font)
    for position, case in enumerate(shown):
        item = case.client
        top = 2 * LINE + position * block
        draw.text((GAP, top), f"client {item.outcome.client} ({item.outcome.group})", fill="black", font=font)
        for column, tile_lines in enumerate(lines[position]):
            left = GAP + column * pitch
            canvas.paste(tile(train_x[item.sample_indices[column]], scale), (left, top + LINE))
            source = case.by_attack[case.chosen[column]].outcome.reconstruction
            matched = int(item.result.assignment[column])
            below = top + LINE + side_y + GAP
            if source is not None and matched >= 0:
                image = source.images[matched].detach().cpu().numpy().reshape(train_x.shape[1:])
                canvas.paste(tile(image, scale), (left, below))
            for line, text in enumerate(tile_lines):
                draw.text((left, below + side_y + 1 + line * LINE), text, fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def display(image: np.ndarray) -> np.ndarray:
    """An image as the grid shows it: H x W x 3 for three channels, else H x W (the first channel), with
    |value| clipped to [0, 1]."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    array = np.clip(np.abs(array), 0.0, 1.0)
    if array.ndim == 3:
        array = np.transpose(array, (1, 2, 0)) if array.shape[0] == 3 else array[0]
    return array
