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
    "DanceGRPOConfig": "flow_trl.trainer",
    "DanceGRPOTrainer": "flow_trl.trainer",
    "FlowAWMConfig": "flow_trl.trainer",
    "FlowAWMTrainer": "flow_trl.trainer",
    "FlowDPOConfig": "flow_trl.trainer",
    "FlowDPOTrainer": "flow_trl.trainer",
}

if TYPE_CHECKING:
    from .trainer import (
        DanceGRPOConfig,
        DanceGRPOTrainer,
        FlowAWMConfig,
        FlowAWMTrainer,
        FlowDPOConfig,
        FlowDPOTrainer,
        FlowNFTConfig,
        FlowNFTTrainer,
        FlowRLConfig,
        FlowRLTrainer,
        NormGuardMixin,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flow_trl' has no attribute {name!r}")


__all__ = [
    "DanceGRPOConfig",
    "DanceGRPOTrainer",
    "FlowAWMConfig",
    "FlowAWMTrainer",
    "FlowDPOConfig",
    "FlowDPOTrainer",
    "FlowNFTConfig",
    "FlowNFTTrainer",
    "FlowRLConfig",
    "FlowRLTrainer",
    "NormGuardMixin",
    "__version__",
]
