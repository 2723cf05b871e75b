"""Adapter for `QwenImagePipeline` (Qwen-Image)."""

from __future__ import annotations

import torch
from torch import nn

from .base import MMDIT_ATTENTION_PROJECTIONS, Conditioning
from .packed import PackedLatentAdapter


class QwenImageAdapter(PackedLatentAdapter):
    """Qwen-Image: Qwen2.5-VL prompt features (last hidden state of the templated prompt, template tokens dropped),
    `QwenImageTransformer2DModel` on packed 2x2 tokens, VAE latents normalised per channel.

    `guidance_scale` is the pipeline's ``true_cfg_scale`` with the trainer's negative prompt; the guided velocity
    is rescaled per token to the norm of the conditional one, as `QwenImagePipeline` does (`combine_guidance`).
    The pipeline pads prompts to the longest in the batch; here every prompt is padded to `max_sequence_length`
    with a zero attention mask, so conditionings of different batches (and the negative prompt) concatenate.
    Masked text tokens are invisible to the image tokens, so the velocity is the pipeline's.
    """

    pipeline_class_names = ("QwenImagePipeline",)
    default_lora_target_modules = MMDIT_ATTENTION_PROJECTIONS

    def __init__(self, pipe, max_sequence_length: int | None = None, decode_batch_size: int | None = 16):
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("Guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported.")
        super().__init__(pipe, max_sequence_length, decode_batch_size)

    def default_max_sequence_length(self) -> int:
        return 512  # QwenImagePipeline.__call__'s default

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.pipe.vae, self.pipe.text_encoder) if m is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.pipe.encode_prompt(
            prompts, device=self.transformer.device, max_sequence_length=self.max_sequence_length
        )
        batch, length = embeds.shape[:2]
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - length
        return {
            "prompt_embeds": nn.functional.pad(embeds, (0, 0, 0, pad)),
            "prompt_embeds_mask": nn.functional.pad(mask, (0, pad)),
        }

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning):
        dtype = self.transformer_dtype
        side = self.token_grid(latents)
        return transformer(
            hidden_states=latents.to(dtype),
            timestep=self.model_timestep(sigma),
            guidance=None,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=cond["prompt_embeds_mask"],
            img_shapes=[[(1, side, side)]] * latents.shape[0],
            return_dict=False,
        )[0]

    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """CFG rescaled per token to the conditional velocity's norm (over the packed channels)."""
        guided = super().combine_guidance(v_uncond, v_cond, guidance_scale)
        return guided * (v_cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    def noise_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        h, w = self._latent_size(height, width)
        return (batch_size, 1, self.transformer.config.in_channels // 4, h, w)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Noise ``[B, 1, C, h, w]`` or VAE latents ``[B, C, 1, h, w]`` (the same memory with one frame) -> tokens."""
        b, h, w = latents.shape[0], latents.shape[-2], latents.shape[-1]
        return self.pipe._pack_latents(latents, b, latents.shape[1:-2].numel(), h, w)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        size = self.image_size(tokens)
        return self.pipe._unpack_latents(tokens, size, size, self.pipe.vae_scale_factor)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.pipe.vae.encode(pixels[:, :, None], return_dict=False)[0].mode()
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(latents)
        return self.pipe.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
