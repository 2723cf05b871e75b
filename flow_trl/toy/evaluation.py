"""Held-out evaluation of a text-to-image pipeline on the shapes world."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..images import save_image_grid
from .scorer import aggregate, score_batch
from .world import TAGS, split_prompts


DEFAULT_NUM_INFERENCE_STEPS = 10
DEFAULT_GUIDANCE_SCALE = 1.0  # the shapes pipeline is best without CFG (docs/toy.md)


def evaluation_rows(num_per_family: int = 48, seed: int = 0) -> list[dict[str, Any]]:
    """A family-balanced list of held-out prompts with fixed seeds.

    Each family contributes `num_per_family` rows, cycling through its held-out prompts; row ``i`` of a family has
    seed ``seed + i`` so that repeated prompts get different images. The default gives 6 x 48 = 288 rows.
    """
    if num_per_family < 1:
        raise ValueError(f"num_per_family must be at least 1; got {num_per_family}: every family needs an image.")
    test = split_prompts("test")
    rows = []
    for tag in TAGS:
        family = [r for r in test if r["tag"] == tag]
        rows += [{**family[i % len(family)], "seed": seed + i} for i in range(num_per_family)]
    return rows


def sigma_schedule(num_inference_steps: int) -> list[float]:
    """The ``sigmas`` to pass to the pipeline so that it samples on the trainers' grid, ``linspace(1, 1/N, N)``.

    `FlowMatchEulerDiscreteScheduler.set_timesteps` applies its static shift to custom sigmas, so the pipeline then
    steps through `flow_trl.sampling.sigma_grid(N, shift)`, the grid every trainer rolls out on. (Passing an already
    shifted grid would shift it twice and leave one large last step.)
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1; got {num_inference_steps}.")
    return torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps, dtype=torch.float64).tolist()


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = 48,
) -> torch.Tensor:
    """Deterministic ODE (Euler) sampling through the pipeline itself: ``[B, 3, H, W]`` in [0, 1] on CPU."""
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds.")
    sigmas = sigma_schedule(num_inference_steps)
    images = []
    for i in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        out = pipe(
            prompts[i : i + batch_size],
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            generator=generators,
            max_sequence_length=pipe.tokenizer_3.model_max_length,
            output_type="pt",
        )
        images.append(out.images.float().cpu().clamp(0, 1))
    return torch.cat(images)


def evaluate_pipeline(
    pipe,
    num_per_family: int = 48,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    grid_path: str | os.PathLike | None = None,
    grid_per_family: int = 8,
) -> dict[str, float]:
    """Score a pipeline on held-out shapes prompts with fixed seeds and ODE sampling.

    Returns ``score`` (GenEval partial credit) and ``strict`` (all clauses right) overall and per family
    (``score/<tag>``, ``strict/<tag>``), and the reward-independent ``quality``. With `grid_path`, also saves a
    PNG with `grid_per_family` samples of each family, one family per row.
    """
    if grid_path is not None and grid_per_family < 1:
        raise ValueError(f"grid_per_family must be at least 1; got {grid_per_family} (grid_path=None: no grid).")
    rows = evaluation_rows(num_per_family, seed)
    images = generate(pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows], num_inference_steps,
                      guidance_scale)
    results = aggregate(score_batch(images, rows))
    if grid_path is not None:
        per_row = min(grid_per_family, num_per_family)
        picks = [t * num_per_family + i for t in range(len(TAGS)) for i in range(per_row)]
        save_image_grid(images[picks], grid_path, ncols=per_row, labels=list(TAGS))
    return results
