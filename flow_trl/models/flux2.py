"""Adapter for `Flux2KleinPipeline` (FLUX.2-klein, base and step-distilled)."""

from __future__ import annotations

import torch
from torch import nn

from .base import MMDIT_ATTENTION_PROJECTIONS, Conditioning
from .packed import PackedLatentAdapter


class Flux2KleinAdapter(PackedLatentAdapter):
    """FLUX.2-klein: Qwen3 prompt features (hidden states of layers 9, 18, 27 stacked on the channel axis, from the
    chat-templated prompt), `Flux2Transformer2DModel` on packed tokens with 4-axis position ids.

    Guidance is CFG against the empty prompt, as `Flux2KleinPipeline` does for the base model; the step-distilled
    model (``is_distilled`` in the pipeline config) ignores `guidance_scale`, as the pipeline does. Latents are
    the VAE latents patchified 2x2 and normalised by the VAE's batch-norm statistics (the pipeline's convention);
    the shift ``mu`` is the pipeline's `compute_empirical_mu` of the sequence length and the step count.
    """

    pipeline_class_names = ("Flux2KleinPipeline",)
    # both streams' attention in the double blocks and the fused qkv+mlp input projection of the single blocks
    # (ours: the single blocks' output projection shares its name with the double blocks' ModuleList)
    default_lora_target_modules = (*MMDIT_ATTENTION_PROJECTIONS, "attn.to_qkv_mlp_proj")

    def default_max_sequence_length(self) -> int:
        return min(self.pipe.tokenizer_max_length, self.pipe.tokenizer.model_max_length)

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.pipe.vae, self.pipe.text_encoder) if m is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, _ = self.pipe.encode_prompt(
            prompts, device=self.transformer.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds}

    def mu(self, height: int, width: int, num_inference_steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        h, w = self._latent_size(height, width)
        return compute_empirical_mu((h // 2) * (w // 2), num_inference_steps)

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning):
        dtype = self.transformer_dtype
        embeds = cond["prompt_embeds"].to(dtype)
        side = self.token_grid(latents)
        grid = latents.new_empty((latents.shape[0], 1, side, side))  # only its shape is read
        return transformer(
            hidden_states=latents.to(dtype),
            timestep=self.model_timestep(sigma),
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=self.pipe._prepare_text_ids(embeds).to(latents.device),
            img_ids=self.pipe._prepare_latent_ids(grid).to(latents.device),
            return_dict=False,
        )[0]

    def applies_cfg(self, guidance_scale: float) -> bool:
        """CFG for the base model; the step-distilled one ignores `guidance_scale`, as the pipeline does."""
        return guidance_scale != 1.0 and not self.pipe.config.get("is_distilled", False)

    def noise_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        h, w = self._latent_size(height, width)
        return (batch_size, self.transformer.config.in_channels, h // 2, w // 2)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._pack_latents(latents)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        side = self.token_grid(tokens)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.pipe._patchify_latents(self.pipe.vae.encode(pixels, return_dict=False)[0].mode())
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn_stats(latents)
        return self.pipe.vae.decode(self.pipe._unpatchify_latents(latents * std + mean), return_dict=False)[0]
