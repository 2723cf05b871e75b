"""What a trainer needs from a text-to-image pipeline, independent of its family.

A model adapter wraps one `diffusers` pipeline and answers six questions: how to encode prompts (once per unique
prompt, with the negative prompt for CFG), how to predict the velocity at ``(latents, sigma, conditioning)`` with
or without guidance, how to draw the initial noise, which sigma grid the pipeline samples on at a resolution, how
to decode latents to images in [0, 1], and which modules LoRA targets by default. Conditioning is a
``dict[str, Tensor]`` with the batch on dim 0, so trainers can buffer, index and repeat it without knowing the
family. Latents are whatever tensor the family's transformer consumes (``[B, C, H, W]`` for SD3, packed tokens
``[B, L, D]`` for FLUX and Qwen-Image); only the adapter knows their layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from ..sampling import sigma_grid


Conditioning = dict[str, torch.Tensor]

# both streams' attention projections of an MMDiT block (diffusers names): the default LoRA targets of SD3, FLUX.1
# and Qwen-Image, as used by the SD3.5 RL references (flow_grpo, NFT, AWM, OPD)
MMDIT_ATTENTION_PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def index_conditioning(cond: Conditioning, index: torch.Tensor | slice) -> Conditioning:
    """Select rows of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}


def cat_conditioning(conds: list[Conditioning]) -> Conditioning:
    """Concatenate conditionings along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


@contextmanager
def onloaded(modules: Sequence[nn.Module], device: torch.device | str, offload: bool = True) -> Iterator[None]:
    """Run the body with `modules` on `device`, then move them back to the CPU; with ``offload=False``, leave them
    where they are.

    The round trip of diffusers' `enable_model_cpu_offload`, for the frozen modules a trainer only calls now and
    then (text encoders, VAE, reward models) while the trained transformer stays on the accelerator: their memory
    there is free between calls, for one host-device copy of their weights per call. Moving does not change a
    module's values, so results are the same either way.
    """
    if not offload:
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")


def dtype_reader(module: nn.Module) -> Callable[[], torch.dtype]:
    """A constant-time reader of `module.dtype` as diffusers defines it: the compute dtype of a layerwise-casting
    hook, else the dtype of the first floating-point parameter outside `_keep_in_fp32_modules`.

    Diffusers' `dtype` walks every module on each read; the reader locates the deciding weight once and reads it by
    its owner module and name, so it follows later casts (`module.to(dtype)`) and wrappers such as LoRA layers.
    """
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            return lambda: hook.compute_dtype
    keep_in_fp32 = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, param in module.named_parameters():
        if param.is_floating_point() and not any(m in name for m in keep_in_fp32):
            owner_name, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            return lambda: getattr(owner, attribute).dtype
    return lambda: module.dtype


class FlowModelAdapter:
    """Base class of the per-family adapters; see `flow_trl.models.sd3.SD3Adapter` for a complete one.

    Args:
        pipe: the `diffusers` pipeline (its transformer is the trained module).
        max_sequence_length (`int`, *optional*): text length for the family's long text encoder; the adapter's
            default when `None`.
        decode_batch_size (`int`, *optional*, defaults to 16): latents the VAE decodes at once (`decode` splits
            larger batches); `None` decodes the whole batch in one call.
    """

    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    default_lora_target_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipe, max_sequence_length: int | None = None, decode_batch_size: int | None = 16):
        if decode_batch_size is not None and decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be at least 1 (or None: one call); got {decode_batch_size}.")
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length()
        self.decode_batch_size = decode_batch_size
        # (transformer, reader) of `transformer_dtype`
        self._transformer_dtype_reader: tuple[nn.Module, Callable[[], torch.dtype]] | None = None

    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def transformer_dtype(self) -> torch.dtype:
        """The transformer's dtype (what its inputs are cast to), in constant time on every forward (`dtype_reader`,
        located again if the pipeline's transformer is replaced)."""
        transformer = self.transformer
        cached = self._transformer_dtype_reader
        if cached is None or cached[0] is not transformer:
            cached = self._transformer_dtype_reader = (transformer, dtype_reader(transformer))
        return cached[1]()

    @property
    def scheduler_shift(self) -> float:
        """The static sigma shift of the pipeline's scheduler (1.0 when it has none)."""
        return float(self.pipe.scheduler.config.get("shift", 1.0))

    def sigma_shift(self, height: int, width: int, num_inference_steps: int) -> float:
        """The static shift ``s`` (``s u / (1 + (s - 1) u)``) the pipeline applies at this resolution and step count.

        Trainers draw shifted training timesteps with it (`flow_trl.timesteps.sample_training_sigmas`). Static for
        SD3; families with resolution-dependent shifting override it.
        """
        return self.scheduler_shift

    def unused_lora_modules(self) -> list[str]:
        """Default LoRA targets whose output never reaches the prediction (excluded, so no adapter weight is dead)."""
        return []

    def sigma_grid(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The ``[N + 1]`` fp32 sampling grid (1 -> 0) for images of ``height x width`` (see `sampling.sigma_grid`)."""
        return sigma_grid(num_inference_steps, self.sigma_shift(height, width, num_inference_steps))

    def default_max_sequence_length(self) -> int:
        raise NotImplementedError

    def frozen_modules(self) -> list[nn.Module]:
        """Every module other than the transformer (text encoders, VAE): frozen and in eval mode."""
        raise NotImplementedError

    def text_encoders(self) -> list[nn.Module]:
        """The frozen modules `encode_prompts` runs: every one but the VAE."""
        vae = getattr(self.pipe, "vae", None)
        return [module for module in self.frozen_modules() if module is not vae]

    def release_text_encoders(self) -> None:
        """Drop the pipeline's text encoders (its attributes become `None`), so their memory is freed unless
        something else holds them; `encode_prompts` cannot run afterwards."""
        encoders = self.text_encoders()
        for name, component in list(self.pipe.components.items()):
            if any(component is encoder for encoder in encoders):
                setattr(self.pipe, name, None)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning for each prompt (batch = len(prompts)), without gradient."""
        raise NotImplementedError

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning):
        """The raw velocity prediction of `transformer` (no CFG) at ``sigma`` ([B], in [0, 1])."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latents for an image of ``height x width`` pixels."""
        raise NotImplementedError

    def check_image_size(self, height: int, width: int, multiple: int, reason: str) -> None:
        """Raise a `ValueError` naming the valid sizes unless `height` and `width` are positive multiples of
        `multiple` (`reason` says where it comes from, e.g. ``"VAE downsampling 8 x patch size 2"``)."""
        bad = [size for size in (height, width) if size <= 0 or size % multiple]
        if not bad:
            return
        nearest = ""
        if bad[0] > 0:
            below = max(bad[0] // multiple, 1) * multiple
            nearest = f"the nearest valid sizes to {bad[0]} are {below} or {below + multiple}; "
        raise ValueError(
            f"Image height and width must be positive multiples of {multiple} for {type(self.pipe).__name__} "
            f"({reason}); got {height}x{width}: {nearest}the pipeline's default is {self.default_resolution}."
        )

    def decode_batch(self, latents: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """`decode` on one VAE batch (the family's implementation)."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images ``[B, 3, H, W]`` in [0, 1] (the inverse of `decode`), without gradient."""
        raise NotImplementedError

    @property
    def default_resolution(self) -> int:
        raise NotImplementedError

    # ---- shared by every family -----------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (fp32) from latents; differentiable only with `requires_grad`.

        Decodes `decode_batch_size` latents per VAE call: less peak memory on GPU, and on CPU 16 at a time is about
        1.8-2.4x as fast as 64 at once (`benchmarks/decode_batch.py`). Each image's
        decoding is independent of the others in its batch, so the result does not depend on the split.
        """
        size = self.decode_batch_size or len(latents)
        return torch.cat([self.decode_batch(chunk, requires_grad) for chunk in latents.split(size)])

    def velocity(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        negative_cond: Conditioning | None = None,
    ) -> torch.Tensor:
        """Velocity with classifier-free guidance (`combine_guidance`) when ``guidance_scale != 1``.

        `guidance_scale` means what the pipeline's own `guidance_scale` (or `true_cfg_scale`) means; families whose
        guidance is not CFG (FLUX.1's guidance embedding) override this method. The conditional and unconditional
        halves run as one batch, so rollout and training see the same batch composition. `negative_cond` holds one
        row (broadcast) or one row per sample.
        """
        if not self.applies_cfg(guidance_scale):
            return self.predict(transformer, latents, sigma, cond)
        if negative_cond is None:
            raise ValueError("guidance_scale != 1 needs the negative-prompt conditioning (`negative_cond`).")
        b = latents.shape[0]
        neg = {k: v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in negative_cond.items()}
        both = cat_conditioning([neg, cond])
        v_uncond, v_cond = self.predict(
            transformer, torch.cat([latents, latents]), torch.cat([sigma, sigma]), both
        ).chunk(2)
        return self.combine_guidance(v_uncond, v_cond, guidance_scale)

    def applies_cfg(self, guidance_scale: float) -> bool:
        """Whether `velocity` runs CFG at this scale (families whose pipeline ignores the scale override it)."""
        return guidance_scale != 1.0

    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance ``v_u + g (v_c - v_u)``; families whose pipeline combines otherwise override it."""
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def initial_noise(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Standard normal latents drawn in fp32 on the generator's device, then cast to `dtype`."""
        device = generator.device if generator is not None else torch.device("cpu")
        shape = (batch_size, *self.latent_shape(height, width))
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return noise.to(self.transformer.device, dtype)
