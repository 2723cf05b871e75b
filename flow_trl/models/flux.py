"""Adapter for `FluxPipeline` (FLUX.1-dev and FLUX.1-schnell)."""

from __future__ import annotations

import torch
from torch import nn

from .base import MMDIT_ATTENTION_PROJECTIONS, Conditioning
from .packed import PackedLatentAdapter


class FluxAdapter(PackedLatentAdapter):
    """FLUX.1: CLIP (pooled) + T5 prompts, `FluxTransformer2DModel` on packed 2x2 tokens with position ids.

    Guidance is FLUX.1-dev's guidance *embedding*, not CFG: `velocity` runs one forward with ``guidance_scale``
    embedded, exactly as `FluxPipeline(guidance_scale=...)` does (FLUX.1-schnell has no guidance embedding and
    ignores it, as the pipeline does). `FluxPipeline`'s optional true CFG (``true_cfg_scale``) is not used. The
    shift ``mu`` is the pipeline's `calculate_shift` of the image sequence length.
    """

    pipeline_class_names = ("FluxPipeline",)
    default_lora_target_modules = MMDIT_ATTENTION_PROJECTIONS  # "attn.to_q/k/v" also match the single blocks

    def default_max_sequence_length(self) -> int:
        tokenizer = self.pipe.tokenizer_2
        return min(512, tokenizer.model_max_length) if tokenizer is not None else 512

    def frozen_modules(self) -> list[nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2")
        return [getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, None, device=self.transformer.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds, "pooled_projections": pooled}

    def predict(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """Velocity at ``sigma`` with `guidance` embedded (FLUX.1-dev; ignored by models without the embedding)."""
        dtype = self.transformer_dtype
        batch, device = latents.shape[0], latents.device
        side = self.token_grid(latents)
        embeds = cond["prompt_embeds"].to(dtype)
        guidance_vec = None
        if self.transformer.config.guidance_embeds:
            guidance_vec = torch.full((batch,), guidance, device=device, dtype=torch.float32)
        return transformer(
            hidden_states=latents.to(dtype),
            timestep=self.model_timestep(sigma),
            guidance=guidance_vec,
            pooled_projections=cond["pooled_projections"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=self.pipe._prepare_latent_image_ids(batch, side, side, device, dtype),
            return_dict=False,
        )[0]

    def velocity(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        negative_cond: Conditioning | None = None,
    ) -> torch.Tensor:
        """One forward with ``guidance_scale`` as the embedded guidance (`negative_cond` is not used)."""
        return self.predict(transformer, latents, sigma, cond, guidance=guidance_scale)

    def noise_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        h, w = self._latent_size(height, width)
        return (batch_size, self.transformer.config.in_channels // 4, h, w)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        size = self.image_size(tokens)
        return self.pipe._unpack_latents(tokens, size, size, self.pipe.vae_scale_factor)

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = vae.encode(pixels, return_dict=False)[0].mode()
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
