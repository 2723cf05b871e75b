"""Adapter for `StableDiffusion3Pipeline` (SD3, SD3.5 and the shapes world's tiny pipeline)."""

from __future__ import annotations

import torch
from torch import nn

from .base import MMDIT_ATTENTION_PROJECTIONS, Conditioning, FlowModelAdapter


class SD3Adapter(FlowModelAdapter):
    """SD3: two CLIP encoders + T5, `SD3Transformer2DModel` fed ``timestep = 1000 * sigma`` (a float).

    Prompt encoding reuses the pipeline's own `encode_prompt` (CLIP penultimate hidden states concatenated and
    padded to the T5 width, then joined with the T5 sequence; pooled CLIP projections), so embeddings match what
    `pipe(...)` computes. Latents are ``(z - shift_factor) * scaling_factor`` of the VAE, as in the pipeline.
    """

    pipeline_class_names = ("StableDiffusion3Pipeline",)
    default_lora_target_modules = MMDIT_ATTENTION_PROJECTIONS

    def unused_lora_modules(self) -> list[str]:
        """The last block is `context_pre_only`: its text-stream output is dropped, so its `add_q_proj` is unused."""
        blocks = self.transformer.transformer_blocks
        return [f"transformer_blocks.{i}.attn.add_q_proj" for i, block in enumerate(blocks) if block.context_pre_only]

    def default_max_sequence_length(self) -> int:
        tokenizer = self.pipe.tokenizer_3
        return min(256, tokenizer.model_max_length) if tokenizer is not None else 256

    def frozen_modules(self) -> list[nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None]

    @property
    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts,
            None,
            None,
            device=self.transformer.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_projections": pooled}

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning):
        dtype = self.transformer_dtype
        return transformer(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            timestep=sigma.float() * 1000,  # fp32 as in StableDiffusion3Pipeline: bf16 would round t to steps of 4
            return_dict=False,
        )[0]

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f, patch = self.pipe.vae_scale_factor, self.transformer.config.patch_size
        self.check_image_size(height, width, f * patch, f"VAE downsampling {f} x patch size {patch}")
        return (self.transformer.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's mode (deterministic), shifted and scaled as the pipeline's latents."""
        vae = self.pipe.vae
        x = images.to(vae.device, vae.dtype) * 2 - 1
        z = vae.encode(x, return_dict=False)[0].mode()
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()

    def decode_batch(self, latents: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        vae = self.pipe.vae
        with torch.set_grad_enabled(requires_grad):
            z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
