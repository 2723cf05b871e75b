"""Reward functions: the calling convention, built-in names, and weighting.

A reward function is any callable

    fn(prompts: list[str], images: Tensor[B, 3, H, W] in [0, 1], **columns) -> list[float | None] | Tensor[B]

called with keyword arguments: ``prompts``, ``images``, every other column of the prompt dataset (one list entry per
image), and ``trainer_state``. Accept ``**kwargs`` to ignore what you do not use. A `None` (or NaN) entry abstains
for that image: it is left out of that function's statistics and of the weighted sum (useful for multi-task
rewards); an image on which every function abstains gets advantage 0. Anything else (None or a single number
instead of a list, strings, a wrong length, infinite values or values so large that their mean or variance
overflows float32) is an error naming the function.

Built-in reward models (one module per family; each is a `RewardModel`: lazy loading, input checks, batching,
no gradient, ``device``/``dtype``/``batch_size`` arguments) and the shapes world's rewards are registered by name in
`BUILTIN_REWARDS`, imported when a name is resolved; an ``http(s)://`` URL names a `RemoteReward`. See
docs/rewards.md.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._lazy import lazy_attributes
from .base import RewardModel


if TYPE_CHECKING:
    from .clip_based import AestheticScore, CLIPScore, PickScore
    from .compression import JPEGCompressibility, JPEGIncompressibility
    from .detection import DetectorReward
    from .hpsv2 import HPSv2
    from .ocr import OCRReward
    from .remote import RemoteReward

# The reward-model classes by family module, imported on first use like the registry's entries: training with other
# rewards imports none of the families.
_LAZY = {
    "AestheticScore": "clip_based",
    "CLIPScore": "clip_based",
    "PickScore": "clip_based",
    "JPEGCompressibility": "compression",
    "JPEGIncompressibility": "compression",
    "DetectorReward": "detection",
    "HPSv2": "hpsv2",
    "OCRReward": "ocr",
    "RemoteReward": "remote",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


RewardFunc = Callable[..., Any]


@dataclass(frozen=True)
class BuiltinReward:
    """A reward registered by name in `BUILTIN_REWARDS`: ``"module:attr"`` of a reward class (instantiated with
    `kwargs`) or of a reward function, imported only when the name is resolved, so that registering a reward whose
    module is heavy or optional costs nothing."""

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> RewardFunc:
        return _instantiate(_import_object(*self.target.split(":")), self.kwargs)


def _import_object(module_name: str, attr: str) -> Any:
    return getattr(importlib.import_module(module_name), attr)


def _instantiate(obj: Any, kwargs: Mapping[str, Any]) -> RewardFunc:
    """A reward class becomes an instance (with `kwargs`); a reward function is used as it is."""
    return obj(**kwargs) if isinstance(obj, type) else obj


BUILTIN_REWARDS: dict[str, BuiltinReward] = {
    "shapes": BuiltinReward("flow_trl.toy.scorer:ShapesReward"),
    "shapes_strict": BuiltinReward("flow_trl.toy.scorer:ShapesReward", {"strict": True}),
    "shapes_quality": BuiltinReward("flow_trl.toy.scorer:shapes_quality"),
    "pickscore": BuiltinReward("flow_trl.rewards.clip_based:PickScore"),
    "hpsv2": BuiltinReward("flow_trl.rewards.hpsv2:HPSv2"),
    "clipscore": BuiltinReward("flow_trl.rewards.clip_based:CLIPScore"),
    "aesthetic": BuiltinReward("flow_trl.rewards.clip_based:AestheticScore"),
    "ocr": BuiltinReward("flow_trl.rewards.ocr:OCRReward"),
    "geneval_owlv2": BuiltinReward("flow_trl.rewards.detection:DetectorReward"),
    "jpeg_compressibility": BuiltinReward("flow_trl.rewards.compression:JPEGCompressibility"),
    "jpeg_incompressibility": BuiltinReward("flow_trl.rewards.compression:JPEGIncompressibility"),
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
            resolved.append(BUILTIN_REWARDS[func].load())
        elif isinstance(func, str) and func.startswith(("http://", "https://")):
            from .remote import RemoteReward

            resolved.append(RemoteReward(func))
        elif isinstance(func, str) and "." in func:
            module_name, _, attr = func.rpartition(".")
            try:
                imported = _import_object(module_name, attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"Cannot import the reward function {func!r}: {err}") from None
            resolved.append(_instantiate(imported, {}))  # a class: its default instance
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
    """A short name for logging: the function's name (``"lambda"`` for a lambda), or the class name of a callable
    object."""
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "name", None) or getattr(func, "__name__", None) or type(func).__name__
    return str(name).strip("<>")


def unique_names(names: Sequence[str]) -> list[str]:
    """Make names distinct for metric keys: every occurrence of a repeated name gets a suffix ``_1``, ``_2``, ... in
    order (skipping suffixed names already taken); names that occur once are kept. ``["a", "b", "a"] ->
    ["a_1", "b", "a_2"]``."""
    repeated = {name for name in names if names.count(name) > 1}
    taken = set(names)
    counters = dict.fromkeys(repeated, 0)
    out = []
    for name in names:
        if name in repeated:
            counters[name] += 1
            while f"{name}_{counters[name]}" in taken:
                counters[name] += 1
            name = f"{name}_{counters[name]}"
            taken.add(name)
        out.append(name)
    return out


def reward_func_names(funcs: Sequence[RewardFunc]) -> list[str]:
    """The distinct logging names of `funcs` (see `reward_func_name` and `unique_names`): two `partial`s of one
    function, two lambdas or two `RemoteReward`s get their own ``rewards/<name>/...`` metrics."""
    return unique_names([reward_func_name(func) for func in funcs])


_FP32_MAX = torch.finfo(torch.float32).max


def _type_error(name: str, got: str, num_images: int) -> TypeError:
    return TypeError(
        f"Reward function {name!r} returned {got}; it must return a list of floats (None or NaN to abstain on an "
        f"image) or a 1-D tensor, with one value per image ({num_images} here)."
    )


def _as_float(value: Any, name: str, index: int, num_images: int) -> float:
    """One entry of a returned list: None -> NaN, a real number or one-element tensor -> float, else a TypeError."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, (numbers.Real, np.bool_)):
        return float(value)
    raise _type_error(name, f"a list containing {value!r} (a {type(value).__name__}, at index {index})", num_images)


def check_fp32_statistics(values: torch.Tensor, what: str, fix: str) -> None:
    """Raise a `ValueError` if the mean or variance of the non-NaN ``values`` is not finite in float32 (the
    advantages computed from them would be NaN or silently 0). ``what`` names the values, ``fix`` says what to do."""
    finite = values[~torch.isnan(values)].float()
    if not finite.numel():
        return
    mean = finite.mean()
    if not (torch.isfinite(mean) and torch.isfinite(((finite - mean) ** 2).sum())):
        raise ValueError(
            f"{what} (largest magnitude {finite.abs().max().item():.3g}) are too large for float32: their mean or "
            f"variance overflows (float32 ends at {_FP32_MAX:.3g}), so the advantages would be NaN or 0. {fix}"
        )


def reward_values(values: Any, name: str, num_images: int) -> torch.Tensor:
    """Check what the reward function `name` returned for `num_images` images; returns fp32 ``[num_images]``, NaN
    where it abstained.

    Raises:
        TypeError: unless `values` is a list (or tuple, array) of real numbers and `None`s, or a real-valued 1-D
            tensor (``[B, 1]`` is accepted too).
        ValueError: for a wrong number of values, infinite values, or values whose statistics overflow float32.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        values = torch.from_numpy(values)
    elif isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise _type_error(name, f"a tensor of dtype {values.dtype}", num_images)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise _type_error(name, f"a tensor of shape {tuple(values.shape)}", num_images)
        out = values.detach().to("cpu", torch.float64)
    elif isinstance(values, (str, bytes, numbers.Number, Mapping)) or not isinstance(values, Iterable):  # None too
        got = "None" if values is None else f"{values!r:.80} (a {type(values).__name__})"
        raise _type_error(name, got, num_images)
    else:
        out = torch.tensor([_as_float(v, name, i, num_images) for i, v in enumerate(values)], dtype=torch.float64)
    if len(out) != num_images:
        raise ValueError(
            f"Reward function {name!r} returned {len(out)} values for {num_images} images; it must return one value "
            "(or None) per image."
        )
    too_large = out.abs() > _FP32_MAX  # +-inf too
    if too_large.any():
        value = out[too_large][0].item()
        got = "an infinite value" if math.isinf(value) else f"{value:.3g}, beyond float32's range (+-{_FP32_MAX:.3g})"
        raise ValueError(
            f"Reward function {name!r} returned {got}: not a usable reward, it would make the advantages NaN. Return "
            "None (or NaN) to abstain on an image instead, or rescale the reward."
        )
    out = out.float()
    check_fp32_statistics(out, f"The values of reward function {name!r}", "Rescale the reward (e.g. divide it by a "
                          "constant).")
    return out


def compute_rewards(
    reward_funcs: Sequence[RewardFunc],
    prompts: list[str],
    images: torch.Tensor,
    columns: dict[str, list[Any]] | None = None,
    **extra: Any,
) -> torch.Tensor:
    """Call every reward function; returns ``[B, num_funcs]`` fp32 on CPU, NaN where a function abstained.

    Raises:
        TypeError, ValueError: if a function returns something other than one finite value (or None) per image;
            see `reward_values`.
    """
    columns = columns or {}
    names = reward_func_names(reward_funcs)
    out = torch.empty(len(prompts), len(reward_funcs), dtype=torch.float32)
    for j, func in enumerate(reward_funcs):
        out[:, j] = reward_values(func(prompts=prompts, images=images, **columns, **extra), names[j], len(prompts))
    return out


def check_reward_weights(weights: Sequence[float]) -> None:
    """Raise a `ValueError` unless every weight is a finite number and at least one is non-zero."""
    bad = [w for w in weights if not (isinstance(w, numbers.Real) and math.isfinite(w))]
    if bad:
        raise ValueError(
            f"reward_weights must be finite numbers; got {list(weights)}. A NaN weight would turn every weighted "
            "reward into NaN (an abstention) and an infinite one every reward into +-inf or NaN: nothing could be "
            "learned. Give one finite weight per reward function (0 logs a function without training on it)."
        )
    if weights and all(w == 0 for w in weights):
        raise ValueError(
            f"reward_weights are all 0 ({list(weights)}): the weighted reward would be 0 for every image and nothing "
            "could be learned. Give at least one reward function a non-zero weight."
        )


def weighted_reward(rewards: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted sum over functions ignoring NaNs; NaN where every function abstained. ``[B, F] -> [B]``.

    Raises:
        ValueError: for weights that `check_reward_weights` rejects, or weighted sums whose statistics overflow
            float32.
    """
    if weights is not None:
        check_reward_weights(weights)
    w = torch.ones(rewards.shape[1]) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    finite = ~torch.isnan(rewards)
    total = (torch.nan_to_num(rewards) * w).sum(dim=1)
    total = torch.where(finite.any(dim=1), total, torch.full_like(total, float("nan")))
    check_fp32_statistics(total, "The weighted rewards", "Lower `reward_weights` or rescale the rewards.")
    return total


__all__ = [
    "BUILTIN_REWARDS",
    "AestheticScore",
    "BuiltinReward",
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
    "check_reward_weights",
    "compute_rewards",
    "resolve_reward_funcs",
    "reward_func_name",
    "reward_func_names",
    "reward_values",
    "unique_names",
    "weighted_reward",
]
