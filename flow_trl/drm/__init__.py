"""The diffusion-based reward model (DRM), its reward/scorer wrapper, preference data and step-wise sampling.

>>> from flow_trl.drm import DiffusionRewardModel, DRMReward, StepwiseSamplingPipeline
"""

from .data import sample_preference_pairs
from .model import DiffusionRewardModel
from .reward import DRMReward
from .sampling import StepwiseOutput, StepwiseSamplingPipeline, stepwise_sample


__all__ = [
    "DRMReward",
    "DiffusionRewardModel",
    "StepwiseOutput",
    "StepwiseSamplingPipeline",
    "sample_preference_pairs",
    "stepwise_sample",
]
