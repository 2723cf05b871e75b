"""`FlowNFTConfig`: Diffusion-NFT's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import FlowRLConfig
from .utils import SOFT_UPDATE_SCHEDULES


@dataclass
class FlowNFTConfig(FlowRLConfig):
    r"""
    Configuration of [`FlowNFTTrainer`] (Diffusion-NFT, https://huggingface.co/papers/2509.16117).

    Inherits every field of [`FlowRLConfig`]. NFT-specific fields:

    nft_beta (`float`, defaults to `1.0`):
        Strength of the implicit policies: `v+ = b v_theta + (1 - b) v_old`, `v- = (1 + b) v_old - b v_theta`. The
        reference uses 1.0 (0.1 for OCR and multi-reward runs).
    timestep_fraction (`float`, defaults to `0.99`):
        Each sample trains on `int(num_inference_steps * timestep_fraction)` distinct grid sigmas (9 of 10).
    rollout_guidance_scale (`float`, *optional*):
        CFG scale of the rollouts only; training and evaluation keep `guidance_scale`. NFT learns from final images
        alone, so any sampler may produce them (the reference samples with DPM-Solver-2): with `guidance_scale=1.0`
        and e.g. `rollout_guidance_scale=3.0`, the CFG-free policy is trained on guided samples. Unset: the rollouts
        use `guidance_scale`.
    old_policy_decay (`str`, defaults to `"linear"`):
        Soft update of the sampling ("old") policy before each rollout, `old <- d old + (1 - d) theta`, with
        `d = 0` (`"none"`), `min(0.001 step, 0.5)` (`"linear"`, the reference default), or `0` before step 75 and
        `min(0.0075 (step - 75), 0.999)` after (`"delayed"`, the reference's OCR schedule).

    > [!NOTE]
    > Defaults that differ from [`FlowRLConfig`], following the reference: `guidance_scale=1.0` (NFT is CFG-free),
    > `beta=1e-4` (velocity KL to the base model), `scale_rewards="batch"` (flow_grpo's global std). The advantage is
    > clipped to `advantage_clip` (5) and mapped to `r = clip(A / advantage_clip / 2 + 0.5, 0, 1)`. Rollouts use
    > Euler ODE sampling by default (the reference uses a deterministic DPM-Solver-2; NFT accepts any sampler).
    """

    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale (1.0: NFT is CFG-free)."})
    beta: float = field(default=1e-4, metadata={"help": "Velocity KL coefficient to the reference (base) model."})
    scale_rewards: str = field(
        default="batch", metadata={"help": "Advantage std: 'batch' (global std, NFT's default), 'group' or 'none'."}
    )
    nft_beta: float = field(default=1.0, metadata={"help": "Strength of NFT's implicit positive/negative policies."})
    timestep_fraction: float = field(
        default=0.99, metadata={"help": "Fraction of the sampling grid's sigmas trained per sample."}
    )
    rollout_guidance_scale: float | None = field(
        default=None, metadata={"help": "CFG scale of the rollouts only (unset: guidance_scale)."}
    )
    old_policy_decay: str = field(
        default="linear", metadata={"help": "Old-policy soft-update schedule: 'none', 'linear' or 'delayed'."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.nft_beta <= 0:
            raise ValueError(f"nft_beta must be positive; got {self.nft_beta}.")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1]; got {self.timestep_fraction}.")
        if self.rollout_guidance_scale is not None and self.rollout_guidance_scale <= 0:
            raise ValueError(
                f"rollout_guidance_scale must be positive (1.0: no CFG); got {self.rollout_guidance_scale}."
            )
        if self.old_policy_decay not in SOFT_UPDATE_SCHEDULES:
            raise ValueError(
                f"old_policy_decay must be one of {SOFT_UPDATE_SCHEDULES}; got {self.old_policy_decay!r}."
            )
        if self.advantage_clip is None:
            raise ValueError("NFT maps advantages to [0, 1] through advantage_clip; set it (the reference uses 5.0).")
