"""Trainers and their configs (each imported from its module on first use, so that importing one config does not
import every trainer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes


_LAZY = {
    "FlowAWMConfig": "awm_config",
    "FlowAWMTrainer": "awm_trainer",
    "awm_loss": "awm_trainer",
    "FlowRLConfig": "base_config",
    "FlowRLTrainer": "base_trainer",
    "FlowDPOConfig": "dpo_config",
    "FlowDPOTrainer": "dpo_trainer",
    "diffusion_dpo_loss": "dpo_trainer",
    "DRMConfig": "drm_config",
    "DRMTrainer": "drm_trainer",
    "bradley_terry_loss": "drm_trainer",
    "thurstone_loss": "drm_trainer",
    "DanceGRPOConfig": "grpo_config",
    "DanceGRPOTrainer": "grpo_trainer",
    "grpo_clip_loss": "grpo_trainer",
    "ManifoldAnchorMixin": "mixins",
    "NormGuardMixin": "mixins",
    "FlowNFTConfig": "nft_config",
    "FlowNFTTrainer": "nft_trainer",
    "nft_loss": "nft_trainer",
    "FlowOPDConfig": "opd_config",
    "FlowOPDTrainer": "opd_trainer",
    "Policies": "policies",
    "RepeatSampler": "rollout_buffer",
    "StepGRPOConfig": "step_grpo_config",
    "StepGRPOTrainer": "step_grpo_trainer",
}

if TYPE_CHECKING:
    from .awm_config import FlowAWMConfig
    from .awm_trainer import FlowAWMTrainer, awm_loss
    from .base_config import FlowRLConfig
    from .base_trainer import FlowRLTrainer
    from .dpo_config import FlowDPOConfig
    from .dpo_trainer import FlowDPOTrainer, diffusion_dpo_loss
    from .drm_config import DRMConfig
    from .drm_trainer import DRMTrainer, bradley_terry_loss, thurstone_loss
    from .grpo_config import DanceGRPOConfig
    from .grpo_trainer import DanceGRPOTrainer, grpo_clip_loss
    from .mixins import ManifoldAnchorMixin, NormGuardMixin
    from .nft_config import FlowNFTConfig
    from .nft_trainer import FlowNFTTrainer, nft_loss
    from .opd_config import FlowOPDConfig
    from .opd_trainer import FlowOPDTrainer
    from .policies import Policies
    from .rollout_buffer import RepeatSampler
    from .step_grpo_config import StepGRPOConfig
    from .step_grpo_trainer import StepGRPOTrainer


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = [
    "DanceGRPOConfig",
    "DanceGRPOTrainer",
    "DRMConfig",
    "DRMTrainer",
    "FlowAWMConfig",
    "FlowAWMTrainer",
    "FlowDPOConfig",
    "FlowDPOTrainer",
    "FlowNFTConfig",
    "FlowNFTTrainer",
    "FlowOPDConfig",
    "FlowOPDTrainer",
    "FlowRLConfig",
    "FlowRLTrainer",
    "ManifoldAnchorMixin",
    "NormGuardMixin",
    "Policies",
    "RepeatSampler",
    "StepGRPOConfig",
    "StepGRPOTrainer",
    "awm_loss",
    "bradley_terry_loss",
    "diffusion_dpo_loss",
    "grpo_clip_loss",
    "nft_loss",
    "thurstone_loss",
]
