"""Image grids a person can look at: samples of a policy, saved as one PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    ncols: int = 8,
    scale: int = 2,
    labels: Sequence[str] | None = None,
) -> None:
    """Save ``[B, 3, H, W]`` images in [0, 1] as a PNG grid (upscaled `scale` times, 2-pixel white gutters).

    `labels`, one string per row, are written at the left of each row.
    """
    from PIL import Image, ImageDraw

    b, _, h, w = images.shape
    nrows = -(-b // ncols)
    cell_h, cell_w, gutter = h * scale, w * scale, 2
    label_w = 100 if labels else 0
    grid = Image.new("RGB", (label_w + ncols * (cell_w + gutter), nrows * (cell_h + gutter)), "white")
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(b):
        tile = Image.fromarray(pixels[k]).resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(tile, (label_w + (k % ncols) * (cell_w + gutter), (k // ncols) * (cell_h + gutter)))
    if labels:
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(labels[:nrows]):
            draw.text((4, r * (cell_h + gutter) + cell_h // 2 - 6), text, fill="black")
    grid.save(path)


__all__ = ["save_image_grid"]
