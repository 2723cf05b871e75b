"""DDPO's JPEG (in)compressibility rewards: no weights, the size of the image saved as a JPEG."""

from __future__ import annotations

import io

import torch

from .base import RewardModel, to_pil


JPEG_QUALITY = 95  # DDPO's setting


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """Size in kilobytes (1000 bytes) of each image ``[B, 3, H, W]`` in [0, 1] saved as a JPEG of this quality."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JPEGCompressibility(RewardModel):
    """``-size_kb / scale`` of the image as a quality-95 JPEG: smaller files score higher. The prompt is ignored.

    ``scale=1`` is DDPO's reward (Black et al. 2023, ``ddpo_pytorch/rewards.py``); flow_grpo uses ``scale=500``.

    Args:
        scale: divide the (negated) size in kB by this.
        batch_size: see `RewardModel` (runs on CPU; there is no model).
    """

    name = "jpeg_compressibility"
    sign = -1.0

    def __init__(self, scale: float = 1.0, batch_size: int = 32):
        if scale <= 0:
            raise ValueError(f"`scale` must be > 0; got {scale}.")
        super().__init__(device="cpu", batch_size=batch_size)
        self.scale = scale

    def _score(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images) / self.scale


class JPEGIncompressibility(JPEGCompressibility):
    """``+size_kb / scale`` of the image as a quality-95 JPEG: DDPO's incompressibility reward."""

    name = "jpeg_incompressibility"
    sign = 1.0
