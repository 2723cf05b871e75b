"""flow_trl: reinforcement-learning and preference post-training for flow-matching image generators.

>>> from flow_trl import FlowNFTConfig, FlowNFTTrainer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0.dev0"

# Public names, imported on first use so that `import flow_trl` (and the CLI's --help) stays fast.
_LAZY = {
    "FlowRLConfig": "flow_trl.trainer",
    "FlowRLTrainer": "flow_trl.trainer",
    "FlowNFTConfig": "flow_trl.trainer",
    "FlowNFTTrainer": "flow_trl.trainer",
    "NormGuardMixin": "flow_trl.trainer",
    "ManifoldAnchorMixin": "flow_trl.trainer",
    "FlowOPDConfig": "flow_trl.trainer",
    "FlowOPDTrainer": "flow_trl.trainer",
    "DanceGRPOConfig": "flow_trl.trainer",
    "DanceGRPOTrainer": "flow_trl.trainer",
    "FlowAWMConfig": "flow_trl.trainer",
    "FlowAWMTrainer": "flow_trl.trainer",
    "FlowDPOConfig": "flow_trl.trainer",
    "FlowDPOTrainer": "flow_trl.trainer",
    "DRMConfig": "flow_trl.trainer",
    "DRMTrainer": "flow_trl.trainer",
    "StepGRPOConfig": "flow_trl.trainer",
    "StepGRPOTrainer": "flow_trl.trainer",
    "DiffusionRewardModel": "flow_trl.drm",
}

if TYPE_CHECKING:
    from .drm import DiffusionRewardModel
    from .trainer import (
        DanceGRPOConfig,
        DanceGRPOTrainer,
        DRMConfig,
        DRMTrainer,
        FlowAWMConfig,
        FlowAWMTrainer,
        FlowDPOConfig,
        FlowDPOTrainer,
        FlowNFTConfig,
        FlowNFTTrainer,
        FlowOPDConfig,
        FlowOPDTrainer,
        FlowRLConfig,
        FlowRLTrainer,
        ManifoldAnchorMixin,
        NormGuardMixin,
        StepGRPOConfig,
        StepGRPOTrainer,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flow_trl' has no attribute {name!r}")


__all__ = [
    "DanceGRPOConfig",
    "DanceGRPOTrainer",
    "DRMConfig",
    "DRMTrainer",
    "DiffusionRewardModel",
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
    "StepGRPOConfig",
    "StepGRPOTrainer",
    "__version__",
]
