"""Preference datasets (TRL's convention: `prompt`, `chosen`, `rejected`) for offline Diffusion-DPO.

`chosen` and `rejected` hold images: PIL images (a `datasets.Image` column), image file paths, or arrays and tensors
``[H, W, 3]`` or ``[3, H, W]``: integers are 0-255, floats must lie in [0, 1]. A float array outside [0, 1] is refused
rather than guessed at: 0-255 floats and [-1, 1] floats both occur, and a [0, 1] image that slightly overshoots 1
would be ruined by a division by 255. They are resized to the training resolution and encoded once through the VAE
(`encode_preference_dataset`); training then reads the latents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


IMAGE_COLUMNS = ("chosen", "rejected")
LATENT_COLUMNS = ("chosen_latents", "rejected_latents")


def is_preference_dataset(dataset) -> bool:
    """Whether `dataset` has preference columns (either of `chosen`/`rejected`: then both are required)."""
    columns = set(dataset.column_names)
    return bool(columns & set(IMAGE_COLUMNS)) or set(LATENT_COLUMNS) <= columns


def check_preference_dataset(dataset) -> None:
    """Clear errors for a preference dataset with missing columns."""
    columns = set(dataset.column_names)
    if set(LATENT_COLUMNS) <= columns:
        missing = {"prompt"} - columns
    else:
        missing = {"prompt", *IMAGE_COLUMNS} - columns
    if missing:
        raise ValueError(
            f"A preference dataset needs the columns 'prompt', 'chosen' and 'rejected' (TRL's convention, images in "
            f"'chosen'/'rejected'); this one lacks {sorted(missing)} (its columns: {dataset.column_names})."
        )


def load_image(value: Any, resolution: int) -> torch.Tensor:
    """One image as a float ``[3, resolution, resolution]`` tensor in [0, 1]; raises on anything unreadable."""
    from PIL import Image

    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # an undecoded datasets.Image value
        import io

        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value["path"]
    if isinstance(value, str):
        value = Image.open(value)
    if isinstance(value, Image.Image):
        image = value.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if isinstance(value, (np.ndarray, torch.Tensor, list)):
        array = torch.as_tensor(np.asarray(value))
        if array.ndim == 3 and array.shape[-1] == 3 and array.shape[0] != 3:
            array = array.permute(2, 0, 1)
        if array.ndim != 3 or array.shape[0] != 3:
            raise ValueError(f"an image array must be [H, W, 3] or [3, H, W]; got shape {tuple(array.shape)}")
        array = _unit_range(array)
        if array.shape[1:] != (resolution, resolution):
            array = torch.nn.functional.interpolate(array[None], size=(resolution, resolution), mode="bicubic",
                                                    align_corners=False)[0]
        return array.clamp(0, 1)
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def _unit_range(array: torch.Tensor) -> torch.Tensor:
    """An image array as fp32 in [0, 1]: integers are read as 0-255, floats must already lie in [0, 1]."""
    if array.dtype == torch.bool or array.is_complex():
        raise ValueError(f"an image array must hold integers (0-255) or floats (0-1); got dtype {array.dtype}")
    low, high = array.min().item(), array.max().item()
    if not array.is_floating_point():
        if low < 0 or high > 255:
            raise ValueError(f"an integer image must have values in 0-255; this one spans [{low}, {high}]")
        return array.float() / 255.0
    if not torch.isfinite(array).all():
        raise ValueError("a float image has NaN or infinite values")
    if low < 0 or high > 1:
        raise ValueError(
            f"a float image must have values in [0, 1]; this one spans [{low:.4g}, {high:.4g}]. For 0-255 floats "
            "pass `array / 255` (or uint8), for [-1, 1] images `(array + 1) / 2`"
        )
    return array.float()


def encode_preference_dataset(dataset, encode: Callable[[torch.Tensor], torch.Tensor], resolution: int,
                              batch_size: int = 16, model_key: str = ""):
    """Replace the `chosen`/`rejected` images by their latents (`chosen_latents`, `rejected_latents`).

    Args:
        dataset (`datasets.Dataset`): a preference dataset.
        encode (`Callable`): images ``[B, 3, H, W]`` in [0, 1] -> latents (the model adapter's `encode_images`).
        resolution (`int`): images are resized to this size first.
        batch_size (`int`, defaults to `16`): images encoded at once.
        model_key (`str`, *optional*): identifies the VAE (e.g. the model id) in the `datasets` cache fingerprint, so
            that a cached encoding of an on-disk dataset is reused only for the same model and resolution.

    Returns:
        `datasets.Dataset` with torch-formatted latent columns and every other column unchanged.
    """
    check_preference_dataset(dataset)
    if set(LATENT_COLUMNS) <= set(dataset.column_names):
        return dataset

    identical_rows: list[int] = []  # pairs whose two images are equal, reported once after encoding

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, Any]:
        images = {}
        for column in IMAGE_COLUMNS:
            images[column] = []
            for index, value in zip(indices, batch[column]):
                try:
                    images[column].append(load_image(value, resolution))
                except Exception as err:
                    raise ValueError(
                        f"Row {index} of the preference dataset: cannot read its '{column}' image ({err}). Expected "
                        "PIL images, image file paths, or [H, W, 3] / [3, H, W] arrays (integers 0-255, floats 0-1)."
                    ) from None
        identical_rows.extend(i for i, c, r in zip(indices, *images.values()) if torch.equal(c, r))
        return {latent: encode(torch.stack(images[column])).cpu().numpy()
                for column, latent in zip(IMAGE_COLUMNS, LATENT_COLUMNS)}

    key = f"{dataset._fingerprint}|flow_trl-latents|{model_key}|{resolution}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    encoded = dataset.map(encode_batch, batched=True, batch_size=batch_size, with_indices=True,
                          remove_columns=list(IMAGE_COLUMNS), new_fingerprint=fingerprint,
                          desc="Encoding preference images")
    if identical_rows:
        logger.warning(
            f"{len(identical_rows)} of the {len(dataset)} preference pairs have identical 'chosen' and 'rejected' "
            f"images (rows {identical_rows[:5]}{', ...' if len(identical_rows) > 5 else ''}): such a pair carries no "
            "preference, its DPO loss is log 2 with zero gradient, and it only dilutes the batch. Check how the pairs "
            "were built."
        )
    encoded.set_format("torch", columns=list(LATENT_COLUMNS), output_all_columns=True)
    return encoded


def best_worst_pairs(prompts: list[str], images: torch.Tensor, rewards: torch.Tensor, num_generations: int,
                     min_margin: float = 0.0):
    """A preference dataset from groups of samples: each group's highest- and lowest-rewarded images.

    Args:
        prompts (`list[str]`): one per image; groups of `num_generations` consecutive images share their prompt.
        images (`Tensor`): ``[N, 3, H, W]`` in [0, 1].
        rewards (`Tensor`): ``[N]`` (NaN: not scored, never chosen nor rejected).
        num_generations (`int`): images per group.
        min_margin (`float`, defaults to `0.0`): a group whose best and worst rewards differ by this much or less
            gives no pair (ties carry no preference).

    Returns:
        `datasets.Dataset` with `prompt`, `chosen`, `rejected` (uint8 ``[H, W, 3]`` arrays) and `chosen_reward`,
        `rejected_reward`.
    """
    from datasets import Dataset

    if len(prompts) != len(images) or len(images) != len(rewards) or len(images) % num_generations:
        raise ValueError(
            f"best_worst_pairs needs whole groups of {num_generations} with one prompt, image and reward each; got "
            f"{len(prompts)} prompts, {len(images)} images and {len(rewards)} rewards."
        )
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "chosen_reward": [], "rejected_reward": []}
    for start in range(0, len(images), num_generations):
        group = rewards[start : start + num_generations].float()
        if len(set(prompts[start : start + num_generations])) != 1:
            raise ValueError(f"Images {start}-{start + num_generations - 1} form a group but have different prompts.")
        scored = ~torch.isnan(group)
        if scored.sum() < 2:
            continue
        best = int(torch.where(scored, group, -torch.inf).argmax())
        worst = int(torch.where(scored, group, torch.inf).argmin())
        if group[best] - group[worst] <= min_margin:
            continue
        rows["prompt"].append(prompts[start])
        rows["chosen"].append(pixels[start + best])
        rows["rejected"].append(pixels[start + worst])
        rows["chosen_reward"].append(float(group[best]))
        rows["rejected_reward"].append(float(group[worst]))
    return Dataset.from_dict(rows)


@torch.no_grad()
def sample_preference_pairs(trainer, dataset, num_generations: int, batch_size: int = 32, min_margin: float = 0.0,
                            seed: int = 0):
    """Offline preference pairs from a model's own samples: `num_generations` ODE samples of each row's prompt from
    the trainer's current policy (before training: the model it was built on), scored by its reward functions (with
    the row's other columns, weighted as in training), reduced to each prompt's best and worst image
    (`best_worst_pairs`).

    Args:
        trainer ([`FlowRLTrainer`]): any flow_trl trainer built on the model and reward functions to sample and score
            with (e.g. an online [`FlowDPOTrainer`] on the prompts).
        dataset (`datasets.Dataset`): a prompt dataset (`prompt` column; the other columns go to the rewards).
        num_generations (`int`): samples per prompt (at least 2).
        batch_size (`int`, defaults to `32`): images sampled at once.
        min_margin (`float`, defaults to `0.0`): see `best_worst_pairs`.
        seed (`int`, defaults to `0`): seed of the initial noise.

    Returns:
        `datasets.Dataset` in TRL's preference format (`prompt`, `chosen`, `rejected`) plus the two rewards.
    """
    from .rewards import weighted_reward

    if num_generations < 2:
        raise ValueError(f"A preference pair needs at least 2 samples per prompt; got {num_generations}.")
    rows = [row for row in dataset for _ in range(num_generations)]
    generator = torch.Generator().manual_seed(seed)
    images, rewards = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [row["prompt"] for row in batch]
        _, chunks = trainer.sample(prompts, generator)
        batch_images = trainer.decode(torch.cat([c.latents for c in chunks]))
        columns = {k: [row[k] for row in batch] for k in batch[0] if k != "prompt"}
        images.append(batch_images.cpu())
        rewards.append(weighted_reward(trainer.score(prompts, batch_images, columns), trainer.args.reward_weights))
    return best_worst_pairs([row["prompt"] for row in rows], torch.cat(images), torch.cat(rewards).cpu(),
                            num_generations, min_margin)


__all__ = [
    "best_worst_pairs",
    "check_preference_dataset",
    "encode_preference_dataset",
    "is_preference_dataset",
    "load_image",
    "sample_preference_pairs",
]
