"""The common base of the built-in reward models: input checks, lazy loading, batching, no gradient, device/dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


def check_images(images: torch.Tensor) -> None:
    """Raise a `ValueError` that says what to change unless ``images`` is a finite float ``[B, 3, H, W]`` in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"`images` must be a torch.Tensor [B, 3, H, W] in [0, 1]; got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Images must be a float batch of shape [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}. "
            "Pass pipeline outputs with output_type='pt'."
        )
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ValueError("Images must be floating point without NaN or infinite values.")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"Images must be in [0, 1]; got values in [{lo:.3f}, {hi:.3f}]. "
                "If they are in [-1, 1], map them with (x + 1) / 2."
            )


def check_inputs(prompts: Sequence[str], images: torch.Tensor) -> None:
    """Raise a `ValueError` that says what to change unless ``images`` is ``[B, 3, H, W]`` in [0, 1] with one prompt
    per image."""
    if isinstance(prompts, str):
        raise ValueError("`prompts` must be a list of strings, one per image, not a single string.")
    check_images(images)
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(prompts)} prompts but {len(images)} images; they must match.")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] to ``[B, H, W, 3]`` uint8, rounding as flow_grpo and DDPO do before any scorer."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] to RGB PIL images (via :func:`to_uint8`)."""
    return [Image.fromarray(image) for image in to_uint8(images)]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RewardModel:
    """Base class of the built-in rewards: ``reward(prompts, images, **columns) -> Tensor[B]`` (fp32, CPU).

    Subclasses implement :meth:`_load` (build or download the model; called once, on first use) and :meth:`_score`
    (score one chunk of at most ``batch_size`` images, already checked). The base class validates inputs, loads
    lazily, splits the batch into chunks, slices the dataset columns the subclass declares in ``columns`` along with
    them, and runs everything under `torch.no_grad`.

    Args:
        device: where the model runs (default: CUDA if available, else CPU).
        dtype: the model's dtype (fp32 by default; bf16/fp16 halve memory on GPU).
        batch_size: most images per forward pass; a larger batch is scored in chunks with the same result.
    """

    name: str = "reward"
    columns: tuple[str, ...] = ()  # dataset columns that `_score` receives (one entry per image), others are dropped

    def __init__(
        self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, batch_size: int = 32
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}.")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        self.batch_size = batch_size
        self._loaded = False
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={str(self.device)!r}, dtype={self.dtype}, batch_size={self.batch_size})"

    def _load(self) -> None:
        """Build the model and move it to ``self.device`` / ``self.dtype``."""

    def _score(self, prompts: list[str], images: torch.Tensor, **columns: list[Any]) -> torch.Tensor | list:
        """Score one chunk: ``images`` is ``[b, 3, H, W]`` in [0, 1] on CPU; returns ``b`` values (None abstains)."""
        raise NotImplementedError

    def modules(self) -> list[nn.Module]:
        """The torch modules of the loaded model (its `nn.Module` attributes): what a trainer's
        `offload_reward_models` keeps on the CPU between scorings. Subclasses that hold their model otherwise
        override it."""
        return [value for value in vars(self).values() if isinstance(value, nn.Module)]

    def load(self) -> RewardModel:
        """Load the model now instead of on the first call; returns self."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def __call__(self, prompts: list[str], images: torch.Tensor, **columns: Any) -> torch.Tensor:
        check_inputs(prompts, images)
        picked = {name: columns[name] for name in self.columns if columns.get(name) is not None}
        for name, column in picked.items():
            if len(column) != len(prompts):
                raise ValueError(f"Column {name!r} has {len(column)} entries for {len(prompts)} prompts.")
        self.load()
        images = images.detach().float().cpu()
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                values = self._score(list(prompts[chunk]), images[chunk], **{k: v[chunk] for k, v in picked.items()})
                if isinstance(values, torch.Tensor):
                    values = values.detach().float().cpu().reshape(-1)
                else:
                    values = torch.tensor([float("nan") if v is None else float(v) for v in values])
                out.append(values)
        return torch.cat(out) if out else torch.empty(0)
