"""The shapes world's DRM (`flow-trl drm`) as a terminal reward function, for GRPO on a learned, imperfect reward.

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks python benchmarks/heldout_curve.py --trainer grpo --every 50 \
        --output_dir runs/grpo-drm-std-s42 -- --reward_funcs drm_terminal_reward.shapes_drm shapes \
        --reward_weights 1 0 --seed 42

`shapes_drm` scores the images with the DRM in `$SHAPES_DRM` (default `runs/shapes-drm`) on the shipped shapes
pipeline, loaded on first call; the shapes scorer rides along at weight 0 so that the true score is logged.
"""

from __future__ import annotations

import os


_reward = None


def shapes_drm(prompts, images, **kwargs):
    """The DRM's score of each image for its prompt (higher: preferred)."""
    global _reward
    if _reward is None:
        from flow_trl.drm import DRMReward
        from flow_trl.toy import load_shapes_pipeline

        _reward = DRMReward(os.environ.get("SHAPES_DRM", "runs/shapes-drm"), load_shapes_pipeline())
    return _reward(prompts, images)
