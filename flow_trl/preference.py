"""Preference datasets (TRL's convention: `prompt`, `chosen`, `rejected`) for offline Diffusion-DPO.

`chosen` and `rejected` hold images: PIL images (a `datasets.Image` column), image file paths, or arrays
(``[H, W, 3]`` uint8 or floats in [0, 1], or ``[3, H, W]`` tensors in [0, 1]). They are resized to the training
resolution and encoded once through the VAE (`encode_preference_dataset`); training then reads the latents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


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
        array = array.float() / 255.0 if array.dtype == torch.uint8 else array.float()
        if array.shape[1:] != (resolution, resolution):
            array = torch.nn.functional.interpolate(array[None], size=(resolution, resolution), mode="bicubic",
                                                    align_corners=False)[0]
        return array.clamp(0, 1)
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


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

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, Any]:
        out = {}
        for column, latent_column in zip(IMAGE_COLUMNS, LATENT_COLUMNS):
            images = []
            for index, value in zip(indices, batch[column]):
                try:
                    images.append(load_image(value, resolution))
                except Exception as err:
                    raise ValueError(
                        f"Row {index} of the preference dataset: cannot read its '{column}' image ({err}). Expected "
                        "PIL images, image file paths, or [H, W, 3] / [3, H, W] arrays."
                    ) from None
            out[latent_column] = encode(torch.stack(images)).cpu().numpy()
        return out

    key = f"{dataset._fingerprint}|flow_trl-latents|{model_key}|{resolution}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    encoded = dataset.map(encode_batch, batched=True, batch_size=batch_size, with_indices=True,
                          remove_columns=list(IMAGE_COLUMNS), new_fingerprint=fingerprint,
                          desc="Encoding preference images")
    encoded.set_format("torch", columns=list(LATENT_COLUMNS), output_all_columns=True)
    return encoded


__all__ = ["check_preference_dataset", "encode_preference_dataset", "is_preference_dataset", "load_image"]
