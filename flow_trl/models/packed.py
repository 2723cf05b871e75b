"""Shared base of the families whose transformer consumes packed latent tokens: FLUX.1, FLUX.2-klein, Qwen-Image.

These pipelines differ from SD3 in four ways that are handled here, once:

- **Latent layout.** The trainer's latents are the token sequence the transformer consumes, ``[B, L, D]`` with
  ``L = (H / 2f) (W / 2f)`` for a VAE factor ``f`` (2x2 latent patches, ``D = transformer.config.in_channels``).
  Rollouts, stored states and training inputs therefore need no repacking; only `decode` and `encode_images`
  unpack and pack (with the pipeline's own packing functions). Trainers generate square images, so the token grid
  is recovered from ``L``.
- **Initial noise** is drawn in the pipeline's unpacked shape and packed as the pipeline packs it, so a seed gives
  exactly the noise `pipe(..., generator=torch.Generator().manual_seed(seed))` starts from.
- **Timestep convention.** The transformers take ``timestep = sigma`` and multiply by 1000 inside
  (`model_timestep`, the one place where this is decided).
- **Resolution-dependent shift.** The sampling grid is the pipeline's: ``linspace(1, 1/N, N)`` passed as `sigmas`
  to the scheduler's `set_timesteps` with the family's `mu` (computed from the image sequence length), so
  dynamic shifting, ``time_shift_type`` and ``shift_terminal`` apply exactly as in ``pipe(...)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import FlowModelAdapter


class PackedLatentAdapter(FlowModelAdapter):
    """Base class of the packed-token families; subclasses define prompts, `predict`, `mu` and the VAE mapping."""

    @property
    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    # ---- geometry ----------------------------------------------------------------------------------------------

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        """VAE latent height and width (before 2x2 packing) of an image, validating its size."""
        f = self.pipe.vae_scale_factor
        self.check_image_size(height, width, f * 2, f"VAE downsampling {f} x 2x2 packing")
        return height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        h, w = self._latent_size(height, width)
        return ((h // 2) * (w // 2), self.transformer.config.in_channels)

    def image_size(self, latents: torch.Tensor) -> int:
        """Side in pixels of the square images that packed `latents` ``[B, L, D]`` encode."""
        side = math.isqrt(latents.shape[1])
        if side * side != latents.shape[1]:
            raise ValueError(
                f"Packed latents with {latents.shape[1]} tokens do not form a square grid; flow_trl's trainers "
                "generate square images (`resolution`)."
            )
        return side * 2 * self.pipe.vae_scale_factor

    def token_grid(self, latents: torch.Tensor) -> int:
        """Tokens per side of the square token grid of `latents`."""
        return self.image_size(latents) // (2 * self.pipe.vae_scale_factor)

    # ---- sigmas and timesteps ----------------------------------------------------------------------------------

    def mu(self, height: int, width: int, num_inference_steps: int) -> float:
        """The pipeline's resolution-dependent shift parameter: by default `calculate_shift` of the image sequence
        length with the scheduler's settings, as `FluxPipeline` and `QwenImagePipeline` compute it."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        h, w = self._latent_size(height, width)
        return calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def sigma_shift(self, height: int, width: int, num_inference_steps: int) -> float:
        """The static shift equivalent to the scheduler's dynamic shift at ``mu``: ``exp(mu)`` for the exponential
        time shift ``e^mu / (e^mu + 1/t - 1)``, ``mu`` for the linear one (``shift_terminal`` is not included)."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return self.scheduler_shift
        mu = self.mu(height, width, num_inference_steps)
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu

    def sigma_grid(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The grid ``pipe(...)`` samples on: the scheduler's sigmas for ``linspace(1, 1/N, N)`` and `mu`."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1; got {num_inference_steps}.")
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)  # leaves the pipeline's alone
        n = num_inference_steps
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=self.mu(height, width, n))
        return scheduler.sigmas.float().cpu()

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's `timestep` input: sigma itself (it multiplies by 1000 inside)."""
        return sigma.float().to(self.transformer_dtype)

    # ---- latents -----------------------------------------------------------------------------------------------

    def noise_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        """The shape the pipeline draws its initial noise in, before packing."""
        raise NotImplementedError

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Pipeline-layout latents (or noise) -> tokens ``[B, L, D]``."""
        raise NotImplementedError

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L, D]`` -> the normalised latents in the pipeline's VAE layout (the inverse of `pack`)."""
        raise NotImplementedError

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents (posterior mode) of pixels in [-1, 1], in the pipeline's layout."""
        raise NotImplementedError

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] ``[B, 3, H, W]`` of normalised latents in the pipeline's layout."""
        raise NotImplementedError

    def initial_noise(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Standard normal noise drawn (fp32, on the generator's device) in the pipeline's shape, then packed."""
        device = generator.device if generator is not None else torch.device("cpu")
        shape = self.noise_shape(batch_size, height, width)
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return self.pack(noise).to(self.transformer.device, dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return self.pack(self.vae_encode(images.to(vae.device, vae.dtype) * 2 - 1)).float()

    def decode_batch(self, latents: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        vae = self.pipe.vae
        with torch.set_grad_enabled(requires_grad):
            pixels = self.vae_decode(self.unpack(latents.to(vae.device, vae.dtype)))
            return (pixels.float() / 2 + 0.5).clamp(0, 1)
