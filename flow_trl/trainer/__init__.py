"""Trainers and their configs."""

from .base_config import FlowRLConfig
from .base_trainer import FlowRLTrainer, RepeatSampler
from .mixins import NormGuardMixin
from .nft_config import FlowNFTConfig
from .nft_trainer import FlowNFTTrainer, nft_loss


__all__ = [
    "FlowNFTConfig",
    "FlowNFTTrainer",
    "FlowRLConfig",
    "FlowRLTrainer",
    "NormGuardMixin",
    "RepeatSampler",
    "nft_loss",
]
