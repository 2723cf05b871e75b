"""`FlowNFTConfig`: Diffusion-NFT's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import FlowRLConfig, NormGuardArguments
from .utils import SOFT_UPDATE_SCHEDULES
from .validation import check_choice, check_positive


@dataclass
class FlowNFTConfig(NormGuardArguments, FlowRLConfig):
    r"""
    Configuration of [`FlowNFTTrainer`] (Diffusion-NFT, https://huggingface.co/papers/2509.16117).

    Inherits every field of [`FlowRLConfig`]. NFT-specific fields:

    implicit_policy_strength (`float`, defaults to `1.0`):
        Strength `b` of the implicit policies, `v+ = b v_theta + (1 - b) v_old`, `v- = (1 + b) v_old - b v_theta`
        (the paper's guidance strength beta; the loss is divided by it). The reference uses 1.0 (0.1 for OCR and
        multi-reward runs).
    advantage_scale (`float`, defaults to `5.0`):
        Maps advantages to NFT's optimality probability `r = clip(A / advantage_scale / 2 + 0.5, 0, 1)` (`A = 0` gives
        0.5, `A >= advantage_scale` gives 1) and multiplies the loss, as the reference does with its advantage clip
        (5). Independent of `advantage_clip`, which clips the advantages beforehand.
    timestep_fraction (`float`, defaults to `0.99`):
        Each sample trains on `int(num_inference_steps * timestep_fraction)` distinct grid sigmas (9 of 10), each a
        loss chunk of two forwards (trained policy with backward, old policy without) plus those of `beta`.
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
    > Defaults that differ from [`FlowRLConfig`], following the reference: `beta=1e-4` (velocity KL to the base
    > model, at the cost of a third forward per loss chunk, the base model's; `beta=0` saves it),
    > `scale_rewards="batch"` (flow_grpo's global std). As in [`FlowRLConfig`], training is CFG-free
    > (`guidance_scale=1.0`). Rollouts use Euler ODE sampling by default (the reference uses a deterministic
    > DPM-Solver-2; NFT accepts any sampler).
    """

    beta: float = field(
        default=1e-4,
        metadata={"help": "Velocity KL coefficient to the reference (base) model (the reference's 1e-4); > 0 adds one "
                  "reference forward per loss chunk to NFT's two."},
    )
    scale_rewards: str = field(
        default="batch", metadata={"help": "Advantage std: 'batch' (global std, NFT's default), 'group' or 'none'."}
    )
    implicit_policy_strength: float = field(
        default=1.0, metadata={"help": "Strength b of NFT's implicit policies (the paper's guidance strength beta)."}
    )
    advantage_scale: float = field(
        default=5.0, metadata={"help": "r = clip(A / advantage_scale / 2 + 0.5, 0, 1); also multiplies the loss."}
    )
    timestep_fraction: float = field(
        default=0.99,
        metadata={"help": "Fraction of the sampling grid's sigmas trained per sample (one loss chunk each)."},
    )
    rollout_guidance_scale: float | None = field(
        default=None, metadata={"help": "CFG scale of the rollouts only (unset: guidance_scale)."}
    )
    old_policy_decay: str = field(
        default="linear", metadata={"help": "Old-policy soft-update schedule: 'none', 'linear' or 'delayed'."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_positive("implicit_policy_strength", self.implicit_policy_strength)
        check_positive("advantage_scale", self.advantage_scale)
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1]; got {self.timestep_fraction}.")
        if self.rollout_guidance_scale is not None and self.rollout_guidance_scale <= 0:
            raise ValueError(
                f"rollout_guidance_scale must be positive (1.0: no CFG); got {self.rollout_guidance_scale}."
            )
        check_choice("old_policy_decay", self.old_policy_decay, SOFT_UPDATE_SCHEDULES)
