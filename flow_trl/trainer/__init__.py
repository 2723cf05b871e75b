"""Trainers and their configs."""

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
