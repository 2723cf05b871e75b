"""The tiny SD3-architecture pipeline of the shapes world: its components, and loading the shipped weights.

Every component is a real diffusers/transformers class (`StableDiffusion3Pipeline`, `SD3Transformer2DModel`,
`AutoencoderKL`, two `CLIPTextModelWithProjection`, `T5EncoderModel`), so every code path that serves
Stable Diffusion 3/3.5 serves this pipeline too. The tokenizer is an offline word-level `tokenizers` model over
the world's vocabulary, used in all three tokenizer slots.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .world import all_prompts


SHAPES_PIPELINE_DIR = Path(__file__).parent / "assets" / "shapes-sd3"
MAX_SEQUENCE_LENGTH = 16
SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")  # <eos> must not be id 2 (CLIP's legacy pooling rule)
PAD_ID, BOS_ID, UNK_ID, EOS_ID = range(4)


def vocabulary() -> list[str]:
    """Special tokens, then every word of every shapes-world prompt, sorted."""
    words = sorted({w for row in all_prompts() for w in row["prompt"].split()})
    return [*SPECIAL_TOKENS, *words]


def build_tokenizer():
    """A word-level tokenizer (lower-cased, whitespace split, ``<bos> ... <eos>``), max length 16."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_untrained_pipeline(seed: int = 0, qk_norm: str | None = "rms_norm"):
    """The shapes pipeline with freshly initialised weights (what `pretrain.py` starts from).

    Args:
        seed (`int`, defaults to `0`): seed of the initialisation.
        qk_norm (`str`, *optional*, defaults to `"rms_norm"`): query/key normalisation of the transformer's attention
            (SD3.5's choice; it keeps pretraining stable at the recipe's learning rate). `None` builds the layout
            of the first two shipped models.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer)
    clip_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_SEQUENCE_LENGTH,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        hidden_act="gelu",
    )
    t5_config = T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        qk_norm=qk_norm,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip_config),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=T5EncoderModel(t5_config),
        tokenizer_3=build_tokenizer(),
    )


def load_shapes_pipeline(
    path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype = torch.float32,
):
    """Load the pretrained shapes pipeline shipped with flow_trl (offline, a few seconds).

    Args:
        path (`str`, *optional*): a directory written by `save_pretrained`; defaults to the shipped pipeline.
        device (`str` or `torch.device`, *optional*): where to put it; CPU by default.
        torch_dtype (`torch.dtype`, defaults to `torch.float32`): dtype of all components.

    Returns:
        A `diffusers.StableDiffusion3Pipeline`. Generate with ``max_sequence_length=16``; its native
        resolution is 64x64.
    """
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    from ..models import quiet_loading

    path = Path(path) if path is not None else SHAPES_PIPELINE_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No pipeline at {path} (no model_index.json). Rebuild the shipped one with "
            "`python -m flow_trl.toy.pretrain`, or pass the directory it wrote."
        )
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the tiny components trigger harmless size warnings
    try:
        with quiet_loading():  # a few MB: loading bars would only be noise
            pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe
