"""Reward functions: the calling convention, built-in names, and weighting.

A reward function is any callable

    fn(prompts: list[str], images: Tensor[B, 3, H, W] in [0, 1], **columns) -> list[float | None] | Tensor[B]

called with keyword arguments: ``prompts``, ``images``, every other column of the prompt dataset (one list entry per
image), and ``trainer_state``. Accept ``**kwargs`` to ignore what you do not use. A `None` (or NaN) entry abstains
for that image: it is left out of that function's statistics and of the weighted sum (useful for multi-task
rewards); an image on which every function abstains gets advantage 0. Infinite values are an error.

Built-in reward models (one module per family; each is a `RewardModel`: lazy loading, input checks, batching,
no gradient, ``device``/``dtype``/``batch_size`` arguments) are registered by name in `BUILTIN_REWARDS`; an
``http(s)://`` URL names a `RemoteReward`. See docs/rewards.md.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .base import RewardModel
from .clip_based import AestheticScore, CLIPScore, PickScore
from .compression import JPEGCompressibility, JPEGIncompressibility
from .detection import DetectorReward
from .hpsv2 import HPSv2
from .ocr import OCRReward
from .remote import RemoteReward


RewardFunc = Callable[..., Any]


def _shapes(strict: bool = False) -> RewardFunc:
    from ..toy.scorer import ShapesReward

    return ShapesReward(strict=strict)


def _shapes_quality() -> RewardFunc:
    from ..toy.scorer import shapes_quality

    return shapes_quality


BUILTIN_REWARDS: dict[str, Callable[[], RewardFunc]] = {
    "shapes": _shapes,
    "shapes_strict": functools.partial(_shapes, strict=True),
    "shapes_quality": _shapes_quality,
    "pickscore": PickScore,
    "hpsv2": HPSv2,
    "clipscore": CLIPScore,
    "aesthetic": AestheticScore,
    "ocr": OCRReward,
    "geneval_owlv2": DetectorReward,
    "jpeg_compressibility": JPEGCompressibility,
    "jpeg_incompressibility": JPEGIncompressibility,
}


def resolve_reward_funcs(reward_funcs: RewardFunc | str | Sequence[RewardFunc | str] | None) -> list[RewardFunc]:
    """Turn callables, built-in names (see `BUILTIN_REWARDS`), reward server URLs (``"http://host:port/score"``, see
    `RemoteReward`) or ``"package.module.function"`` paths into callables (a dotted path to a class gives an instance
    with default arguments)."""
    if reward_funcs is None:
        raise ValueError("`reward_funcs` is required: pass a callable, a built-in name such as 'shapes', or a list.")
    if callable(reward_funcs) or isinstance(reward_funcs, str):
        reward_funcs = [reward_funcs]
    resolved = []
    for func in reward_funcs:
        if callable(func):
            resolved.append(func)
        elif isinstance(func, str) and func in BUILTIN_REWARDS:
            resolved.append(BUILTIN_REWARDS[func]())
        elif isinstance(func, str) and func.startswith(("http://", "https://")):
            resolved.append(RemoteReward(func))
        elif isinstance(func, str) and "." in func:
            module_name, _, attr = func.rpartition(".")
            try:
                imported = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"Cannot import the reward function {func!r}: {err}") from None
            resolved.append(imported() if isinstance(imported, type) else imported)  # a class: its default instance
        else:
            raise ValueError(
                f"Unknown reward {func!r}. Built-in rewards: {', '.join(sorted(BUILTIN_REWARDS))}; "
                "or a reward server URL (http://...), a callable, or a dotted import path such as "
                "'my_package.rewards.my_reward'."
            )
    if not resolved:
        raise ValueError("`reward_funcs` is empty: pass at least one reward function.")
    return resolved


def reward_func_name(func: RewardFunc) -> str:
    """A short name for logging: the function's name, or the class name of a callable object."""
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "name", None) or getattr(func, "__name__", None) or type(func).__name__
    return str(name)


def compute_rewards(
    reward_funcs: Sequence[RewardFunc],
    prompts: list[str],
    images: torch.Tensor,
    columns: dict[str, list[Any]] | None = None,
    **extra: Any,
) -> torch.Tensor:
    """Call every reward function; returns ``[B, num_funcs]`` fp32 on CPU, NaN where a function abstained.

    Raises:
        ValueError: if a function returns the wrong number of values or an infinite value.
    """
    columns = columns or {}
    out = torch.empty(len(prompts), len(reward_funcs), dtype=torch.float32)
    for j, func in enumerate(reward_funcs):
        values = func(prompts=prompts, images=images, **columns, **extra)
        if isinstance(values, torch.Tensor):
            values = values.detach().float().cpu().reshape(-1).tolist()
        values = [float("nan") if v is None else float(v) for v in values]
        if len(values) != len(prompts):
            raise ValueError(
                f"Reward function {reward_func_name(func)!r} returned {len(values)} values for {len(prompts)} "
                "images; it must return one value (or None) per image."
            )
        if any(v in (float("inf"), float("-inf")) for v in values):
            raise ValueError(
                f"Reward function {reward_func_name(func)!r} returned an infinite value; return None (or NaN) to "
                "abstain on an image instead."
            )
        out[:, j] = torch.tensor(values)
    return out


def weighted_reward(rewards: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted sum over functions ignoring NaNs; NaN where every function abstained. ``[B, F] -> [B]``."""
    w = torch.ones(rewards.shape[1]) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    finite = ~torch.isnan(rewards)
    total = (torch.nan_to_num(rewards) * w).sum(dim=1)
    return torch.where(finite.any(dim=1), total, torch.full_like(total, float("nan")))


__all__ = [
    "BUILTIN_REWARDS",
    "AestheticScore",
    "CLIPScore",
    "DetectorReward",
    "HPSv2",
    "JPEGCompressibility",
    "JPEGIncompressibility",
    "OCRReward",
    "PickScore",
    "RemoteReward",
    "RewardFunc",
    "RewardModel",
    "compute_rewards",
    "resolve_reward_funcs",
    "reward_func_name",
    "weighted_reward",
]
