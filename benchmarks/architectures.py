"""Real-size pipelines with random weights and no download: SD3.5-Medium and FLUX.1-dev architectures.

    from architectures import build_pipeline, count_parameters
    pipe = build_pipeline("sd35-medium", torch_dtype=torch.bfloat16)          # 2.5B-parameter transformer
    pipe = build_pipeline("flux-dev", num_layers=2, num_single_layers=4)      # FLUX.1-dev widths, 6 of 57 blocks

The transformers and VAEs use the published diffusers configs of stabilityai/stable-diffusion-3.5-medium and
black-forest-labs/FLUX.1-dev; `num_layers` (and FLUX's `num_single_layers`) keep the real widths at reduced depth,
`num_attention_heads` reduces the width (tests). The text encoders have one layer each but the real output widths the
transformer reads (CLIP-L 768, CLIP-G 1280 with projection, T5 4096), and real sequence lengths (77 CLIP tokens; 256
T5 tokens for SD3.5, 512 for FLUX.1-dev), so every transformer call has the real shapes. Their vocabulary is the
shapes world's offline word-level tokenizer: prompts must come from that world (`flow_trl.toy.shapes_dataset`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from flow_trl.toy.pipeline import BOS_ID, EOS_ID, PAD_ID, build_tokenizer


ARCHITECTURES = ("sd35-medium", "flux-dev")
CLIP_LENGTH = 77

# transformer/config.json of stabilityai/stable-diffusion-3.5-medium (diffusers SD3Transformer2DModel arguments)
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# transformer/config.json of black-forest-labs/FLUX.1-dev (diffusers FluxTransformer2DModel arguments)
FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# the 16-channel VAE both use (vae/config.json); only the latent scale and shift differ
VAE_16CH: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SD35_VAE_SCALING = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE_SCALING = dict(scaling_factor=0.3611, shift_factor=0.1159)

# transformer parameters and buffers of the full-depth configs above (`count_parameters`, on the meta device): the
# published "2.5B" of SD3.5-Medium counts its 384 x 384 x 1536 positional-embedding buffer (226M values)
EXPECTED_TRANSFORMER_PARAMETERS = {"sd35-medium": 2_243_171_520, "flux-dev": 11_901_408_320}
EXPECTED_TRANSFORMER_BUFFERS = {"sd35-medium": 226_492_416, "flux-dev": 0}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point parameters directly in `dtype` (no fp32 copy of a 2.5B model on the way to bf16)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def transformer_config(name: str, num_layers: int | None = None, num_single_layers: int | None = None,
                       num_attention_heads: int | None = None,
                       dual_attention_layers: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The diffusers arguments of architecture `name`'s transformer, at reduced depth or width if asked.

    Args:
        name: one of `ARCHITECTURES`.
        num_layers: joint (MMDiT) blocks; SD3.5-Medium keeps dual attention in the first 13 of them, FLUX.1-dev
            has 19 double-stream blocks.
        num_single_layers: FLUX.1-dev's single-stream blocks (38); unset with `num_layers` set: `2 * num_layers`,
            the real ratio.
        num_attention_heads: heads of `attention_head_dim` (the width is their product, SD3.5's caption projection
            too); unset: the real 24.
        dual_attention_layers: SD3.5 only: the blocks with a second attention; unset: the first 13 that exist.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}; choose one of {ARCHITECTURES}.")
    config = dict(SD35_MEDIUM_TRANSFORMER if name == "sd35-medium" else FLUX_DEV_TRANSFORMER)
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1; got {num_layers}.")
        config["num_layers"] = num_layers
        if name == "flux-dev":
            config["num_single_layers"] = 2 * num_layers if num_single_layers is None else num_single_layers
    if num_single_layers is not None:
        if name != "flux-dev":
            raise ValueError("num_single_layers applies to flux-dev only (SD3.5 has joint blocks only).")
        config["num_single_layers"] = num_single_layers
    if num_attention_heads is not None:
        config["num_attention_heads"] = num_attention_heads
    if dual_attention_layers is not None:
        if name != "sd35-medium":
            raise ValueError("dual_attention_layers applies to sd35-medium only.")
        config["dual_attention_layers"] = dual_attention_layers
    if name == "sd35-medium":  # the caption projection is as wide as the blocks
        config["caption_projection_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < config["num_layers"])
    return config


def build_transformer(name: str, **overrides: Any) -> nn.Module:
    """The transformer of `name` with random weights on the current default device and dtype; `overrides`: see
    `transformer_config`."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if name == "sd35-medium" else FluxTransformer2DModel
    return cls(**transformer_config(name, **overrides))


def count_parameters(name: str, buffers: bool = False, **overrides: Any) -> int:
    """Parameters (or, with `buffers`, buffer values) of `name`'s transformer, counted on the meta device (no memory,
    no initialisation); `overrides`: see `transformer_config`."""
    with torch.device("meta"):
        module = build_transformer(name, **overrides)
    return sum(t.numel() for t in (module.buffers() if buffers else module.parameters()))


def _tokenizer(max_length: int):
    """The shapes world's word-level tokenizer, padding to `max_length` tokens."""
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def _clip(hidden_size: int, heads: int, projection: bool, vocab_size: int) -> nn.Module:
    """A one-layer CLIP text encoder of the real width (and projection width) and 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        projection_dim=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=heads,
        max_position_embeddings=CLIP_LENGTH,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(vocab_size: int) -> nn.Module:
    """A one-layer T5 encoder of T5-XXL's output width (4096)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=4096, d_kv=64, d_ff=64, num_layers=1, num_heads=2,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
    ))


def build_pipeline(name: str, torch_dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any):
    """A `StableDiffusion3Pipeline` ("sd35-medium") or `FluxPipeline` ("flux-dev") with random weights.

    Args:
        name: one of `ARCHITECTURES`.
        torch_dtype: dtype every component is created in.
        seed: seed of the initialisation.
        overrides: `num_layers`, `num_single_layers`, `num_attention_heads` (see `transformer_config`).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    vocab_size = len(build_tokenizer())
    with default_dtype(torch_dtype):
        transformer = build_transformer(name, **overrides)
        if name == "sd35-medium":
            vae = AutoencoderKL(**VAE_16CH, **SD35_VAE_SCALING)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=vae,
                text_encoder=_clip(768, 12, True, vocab_size),
                tokenizer=_tokenizer(CLIP_LENGTH),
                text_encoder_2=_clip(1280, 20, True, vocab_size),
                tokenizer_2=_tokenizer(CLIP_LENGTH),
                text_encoder_3=_t5(vocab_size),
                tokenizer_3=_tokenizer(256),
            )
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096,
            )
            pipe = FluxPipeline(
                scheduler=scheduler,
                vae=AutoencoderKL(**VAE_16CH, **FLUX_VAE_SCALING),
                text_encoder=_clip(768, 12, False, vocab_size),
                tokenizer=_tokenizer(CLIP_LENGTH),
                text_encoder_2=_t5(vocab_size),
                tokenizer_2=_tokenizer(512),
                transformer=transformer,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe
