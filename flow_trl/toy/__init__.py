"""The embedded shapes world: a tiny pretrained SD3 pipeline, GenEval-style prompts, and a verifiable reward.

>>> from flow_trl.toy import load_shapes_pipeline, shapes_dataset, ShapesReward, evaluate_pipeline
>>> pipe = load_shapes_pipeline()
>>> train = shapes_dataset("train")          # columns: prompt, tag, objects, relation
>>> evaluate_pipeline(pipe)["score"]         # held-out GenEval-style partial credit
"""

from ..images import save_image_grid
from .evaluation import evaluate_pipeline, evaluation_rows, generate, sigma_schedule
from .pipeline import SHAPES_PIPELINE_DIR, build_untrained_pipeline, load_shapes_pipeline
from .scorer import ShapesReward, aggregate, detect_objects, quality, score_batch, score_image
from .world import (
    COLORS,
    PALETTE,
    RELATIONS,
    SHAPES,
    TAGS,
    all_prompts,
    parse_prompt,
    render,
    render_batch,
    shapes_dataset,
    shapes_preference_dataset,
    split_prompts,
)


__all__ = [
    "COLORS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SHAPES_PIPELINE_DIR",
    "TAGS",
    "ShapesReward",
    "aggregate",
    "all_prompts",
    "build_untrained_pipeline",
    "detect_objects",
    "evaluate_pipeline",
    "evaluation_rows",
    "generate",
    "load_shapes_pipeline",
    "parse_prompt",
    "quality",
    "render",
    "render_batch",
    "save_image_grid",
    "score_batch",
    "score_image",
    "shapes_dataset",
    "shapes_preference_dataset",
    "sigma_schedule",
    "split_prompts",
]
