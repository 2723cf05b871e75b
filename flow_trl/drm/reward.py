"""`DRMReward`: a trained DRM as a reward function on images (terminal reward) and a scorer of noisy latents."""

from __future__ import annotations

import os

import torch

from ..models import get_adapter
from ..models.base import Conditioning
from .model import DiffusionRewardModel


class DRMReward:
    """A DRM paired with the generator's pipeline, whose text encoders and VAE it shares.

    - As a reward function (`fn(prompts, images, **columns)`, flow_trl's convention) it encodes the images with the
      pipeline's VAE and scores the clean latents (sigma 0): a terminal reward for any trainer.
    - `score_latents(latents, sigma, cond)` scores latents at any noise level: the step scorer of
      [`StepGRPOTrainer`] and of step-wise sampling.

    Args:
        drm (`DiffusionRewardModel` or `str`): the model, or its path / Hub id (`from_pretrained`).
        pipe: the generator's `diffusers` pipeline (SD3 family): prompts and images are encoded with it.
        batch_size (`int`, defaults to `64`): images scored per forward.
    """

    name = "drm"

    def __init__(self, drm: DiffusionRewardModel | str | os.PathLike, pipe, batch_size: int = 64):
        if not isinstance(drm, DiffusionRewardModel):
            drm = DiffusionRewardModel.from_pretrained(drm)
        self.adapter = get_adapter(pipe)
        self.drm = drm.to(self.adapter.transformer.device).requires_grad_(False).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def score_latents(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """DRM scores ``[B]`` (fp32) of latents at noise level(s) `sigma` (a float or ``[B]``)."""
        return self.drm(latents.to(self.drm.device), torch.as_tensor(sigma, device=self.drm.device), cond)

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs) -> torch.Tensor:
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            cond = self.adapter.encode_prompts(prompts[i : i + self.batch_size])
            latents = self.adapter.encode_images(images[i : i + self.batch_size])
            scores.append(self.score_latents(latents, 0.0, cond).cpu())
        return torch.cat(scores)


__all__ = ["DRMReward"]
