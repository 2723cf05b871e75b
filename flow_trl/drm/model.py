"""`DiffusionRewardModel`: the first K blocks of an SD3 flow transformer plus a light scalar reward head.

The DRM (docs/algorithms.md#drm) scores a latent ``x_sigma`` at any noise level
``sigma`` (0 = clean) for a prompt. Documented by the paper: the backbone is the generator's own DiT, truncated and
initialised from it, conditioned on the timestep and the text; a light head (per-token MLP, reshape, spatial
aggregation) gives one scalar. Ours (no code is public):

- the truncation keeps the *first* `num_blocks` blocks (DRM drops the last three of SD3.5-M's 24; DiNa-LRM keeps
  the first 12): on a small model the choice of K is a config field;
- every kept block is built as the generator's block of that depth, so the weights load unchanged: a full joint
  block, whose text output the last kept block computes and drops, or, when all blocks are kept, the generator's
  final ``context_pre_only`` block (no text output);
- the head is ``LayerNorm -> Linear(d, head_dim) -> GELU -> Linear(head_dim, head_dim)`` per image token, the mean
  over the token grid (a global average pool of the reshaped ``[B, head_dim, H/p, W/p]`` map) and
  ``Linear(head_dim, 1)``; text enters only through the backbone's joint attention and AdaLN.

The conditioning is the generator's: ``{"prompt_embeds", "pooled_projections"}`` from the same text encoders
(`flow_trl.models.SD3Adapter.encode_prompts`), and ``timestep = 1000 * sigma`` as SD3 takes it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..models.base import Conditioning


# the SD3 transformer's config keys the backbone needs (everything but the output layers and the depth)
BACKBONE_CONFIG_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
    "qk_norm",
)
# modules copied from the generator (the blocks are copied separately, the first `num_blocks` of them)
_COPIED_MODULES = ("pos_embed", "time_text_embed", "context_embedder")


class DiffusionRewardModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """A sigma- and text-conditioned reward model on (noisy) SD3 latents.

    Build it from the generator being aligned with [`~DiffusionRewardModel.from_transformer`]; save and load it with
    `save_pretrained` / `from_pretrained` / `push_to_hub` (diffusers' `ModelMixin`). LoRA adapters attach with
    `add_adapter` (diffusers' `PeftAdapterMixin`).

    Args:
        num_blocks (`int`, defaults to `2`): transformer blocks kept from the generator (K).
        head_dim (`int`, defaults to `64`): width of the per-token MLP of the reward head.
        last_block_context_pre_only (`bool`, defaults to `False`): build the last block without a text output, as
            the generator's final block (`from_transformer` sets it when K is the generator's depth).
        sample_size, patch_size, in_channels, attention_head_dim, num_attention_heads, joint_attention_dim,
        caption_projection_dim, pooled_projection_dim, pos_embed_max_size, qk_norm: as in diffusers'
            `SD3Transformer2DModel` (taken from the generator's config by `from_transformer`).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        num_blocks: int = 2,
        head_dim: int = 64,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 96,
        qk_norm: str | None = None,
        last_block_context_pre_only: bool = False,
    ):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1; got {num_blocks}.")
        inner_dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=inner_dim,
            pos_embed_max_size=pos_embed_max_size,
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=inner_dim, pooled_projection_dim=pooled_projection_dim
        )
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    dim=inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=last_block_context_pre_only and i == num_blocks - 1,
                    qk_norm=qk_norm,
                )
                for i in range(num_blocks)
            ]
        )
        self.head_norm = nn.LayerNorm(inner_dim)
        self.head_mlp = nn.Sequential(nn.Linear(inner_dim, head_dim), nn.GELU(), nn.Linear(head_dim, head_dim))
        self.head_out = nn.Linear(head_dim, 1)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, num_blocks: int = 2, head_dim: int = 64) -> DiffusionRewardModel:
        """A DRM whose backbone is a copy of the first `num_blocks` blocks (and the embedders) of `transformer`.

        Args:
            transformer: an `SD3Transformer2DModel` (the generator being aligned; without LoRA layers).
            num_blocks (`int`, defaults to `2`): K, at most the generator's depth.
            head_dim (`int`, defaults to `64`): width of the reward head (randomly initialised).
        """
        config = transformer.config
        if type(transformer).__name__ != "SD3Transformer2DModel":
            raise ValueError(
                f"DiffusionRewardModel is built from an SD3Transformer2DModel (SD3/SD3.5 family); got "
                f"{type(transformer).__name__}."
            )
        if not 1 <= num_blocks <= config.num_layers:
            raise ValueError(f"num_blocks must be in [1, {config.num_layers}] for this transformer; got {num_blocks}.")
        if config.get("dual_attention_layers"):
            raise ValueError("SD3.5-style dual attention layers are not supported by DiffusionRewardModel yet.")
        drm = cls(
            num_blocks=num_blocks,
            head_dim=head_dim,
            last_block_context_pre_only=transformer.transformer_blocks[num_blocks - 1].context_pre_only,
            **{k: config[k] for k in BACKBONE_CONFIG_KEYS},
        )
        source = transformer.state_dict()
        wanted = drm.state_dict()
        copied = {
            k: source[k] for k in wanted if k in source and k.split(".")[0] in (*_COPIED_MODULES, "transformer_blocks")
        }
        missing = [k for k in wanted if not k.startswith("head_") and k not in copied]
        if missing:
            raise ValueError(f"The transformer lacks backbone weights {missing[:5]}: is it an SD3 transformer?")
        drm.load_state_dict(copied, strict=False)
        return drm if drm.dtype == transformer.dtype else drm.to(transformer.dtype)

    def unused_lora_modules(self) -> list[str]:
        """The last block's text-stream projections: its text output is dropped (or, for a `context_pre_only` block,
        never computed past the queries), so they never reach the score."""
        last = f"transformer_blocks.{len(self.transformer_blocks) - 1}.attn"
        if self.config.last_block_context_pre_only:
            return [f"{last}.add_q_proj"]
        return [f"{last}.add_q_proj", f"{last}.to_add_out"]

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Scores ``[B]`` (fp32) of latents ``[B, C, H, W]`` at noise levels `sigma` (``[B]`` in [0, 1])."""
        dtype = self.dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0])
        hidden = self.pos_embed(latents.to(dtype)).contiguous()
        temb = self.time_text_embed(sigma * 1000, cond["pooled_projections"].to(dtype))  # fp32 t, as the pipeline
        context = self.context_embedder(cond["prompt_embeds"].to(dtype))
        for block in self.transformer_blocks:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        tokens = self.head_mlp(self.head_norm(hidden))  # [B, L, head_dim], L = (H/p)(W/p)
        return self.head_out(tokens.mean(dim=1)).squeeze(-1).float()


__all__ = ["DiffusionRewardModel"]
