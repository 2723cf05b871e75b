"""A GenEval-style verifiable scorer for the shapes world, usable as a reward and as an evaluation metric.

GenEval detects objects, then checks counts, colours and positions clause by clause. Here detection is exact
colour segmentation:

1. each pixel takes the nearest of the palette colours and the background, or none if it is further than
   :data:`COLOR_THRESHOLD` from all of them (blur, speckle, off-palette colours);
2. per colour, a small binary opening removes one-pixel speckle, and connected components of at least
   :data:`MIN_AREA` pixels become objects;
3. an object's shape is the template (circle, square, upward triangle) fitted to its bounding box with the best
   intersection-over-union, if that IoU reaches :data:`MIN_SHAPE_IOU` and the box is roughly square; otherwise
   the object has no shape and matches no clause.

Scores follow GenEval's training reward (docs/algorithms.md#geneval-score):

- ``score``: the mean of the clause credits. Each object clause ``(shape, colour, count)`` earns a count credit
  ``max(0, 1 - |count - found| / count)`` where ``found`` counts detections of that shape in any colour; a clause
  with a colour earns a second credit of the same form counting detections of that shape *and* colour; a
  relation earns one 0/1 credit. Objects the prompt does not mention are not penalised, as in GenEval.
- ``strict``: 1.0 when every credit is 1, else 0.0.

:func:`quality` is independent of the prompt: the fraction of clean pixels (near the palette or background) and
of isolated speckle, so that reward hacking shows as falling quality while the score rises.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ..rewards.base import check_images
from .world import BACKGROUND, PALETTE, RELATIONS, SHAPES, TAGS, Metadata, parse_prompt


COLOR_THRESHOLD = 0.3  # max RGB distance from a palette colour (or the background) for a pixel to count as it
MIN_AREA = 12  # smallest connected component (in pixels, at 64x64) that counts as an object
MIN_SHAPE_IOU = 0.6  # smallest template IoU for a component to count as a shape
MAX_ASPECT = 1.6  # the three shapes have square bounding boxes; longer boxes are merged or broken objects
RELATION_MARGIN = 4.0  # pixels the centres must be apart along the relation's axis

_COLOR_NAMES = tuple(PALETTE)
_REFERENCE = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)  # index 0 is the background
_OPENING = ndimage.generate_binary_structure(2, 1)  # 3x3 cross


def _check_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Validate a batch of images ``[B, 3, H, W]`` in [0, 1] and return it as a float32 ``[B, H, W, 3]`` array."""
    images = torch.as_tensor(images).detach().float().cpu() if isinstance(images, np.ndarray) else images
    check_images(images)
    return images.detach().float().cpu().numpy().transpose(0, 2, 3, 1).clip(0, 1)


def _nearest_labels(image: np.ndarray) -> np.ndarray:
    """Per pixel: 0 background, 1..5 palette colour (in :data:`PALETTE` order), -1 none within the threshold."""
    dist = np.linalg.norm(image[:, :, None, :] - _REFERENCE[None, None], axis=-1)
    labels = dist.argmin(axis=-1)
    labels[dist.min(axis=-1) > COLOR_THRESHOLD] = -1
    return labels


def _template_masks(height: int, width: int) -> dict[str, np.ndarray]:
    """Each shape drawn to fill a ``height x width`` box, sampled at pixel centres."""
    ys, xs = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    return {
        "circle": (xs - 0.5) ** 2 + (ys - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(xs - 0.5) <= ys / 2,  # apex at the top centre, base along the bottom
    }


def _classify(mask: np.ndarray) -> tuple[str | None, float]:
    """Best-fitting shape of a component cropped to its bounding box, and its IoU (``None`` if none fits)."""
    height, width = mask.shape
    if max(height, width) > MAX_ASPECT * min(height, width):
        return None, 0.0
    best, best_iou = None, 0.0
    for shape, template in _template_masks(height, width).items():
        iou = (mask & template).sum() / (mask | template).sum()
        if iou > best_iou:
            best, best_iou = shape, float(iou)
    return (best, best_iou) if best_iou >= MIN_SHAPE_IOU else (None, best_iou)


def detect_objects(image: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Detect the objects in one image ``[3, H, W]`` in [0, 1].

    Returns one dict per object: ``shape`` (or ``None`` if no template fits), ``color``, ``cx``, ``cy`` (pixel
    centroid, y grows downwards), ``area`` and ``iou`` (the fit of the chosen template), in raster order.
    """
    pixels = _check_images(image[None])[0]
    scale = pixels.shape[0] / 64
    min_area = max(1, round(MIN_AREA * scale**2))
    labels = _nearest_labels(pixels)
    objects = []
    for index, color in enumerate(_COLOR_NAMES, start=1):
        mask = ndimage.binary_opening(labels == index, structure=_OPENING)
        components, n = ndimage.label(mask)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            component = components[box] == k
            area = int(component.sum())
            if area < min_area:
                continue
            shape, iou = _classify(component)
            cy, cx = ndimage.center_of_mass(component)
            objects.append({"shape": shape, "color": color, "cx": box[1].start + cx + 0.5,
                            "cy": box[0].start + cy + 0.5, "area": area, "iou": iou})
    objects.sort(key=lambda o: (o["cy"], o["cx"]))
    return objects


def _relation_holds(a: dict[str, Any], b: dict[str, Any], relation: str) -> bool:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    if relation == "left of":
        return dx >= RELATION_MARGIN and dx >= abs(dy)
    if relation == "right of":
        return -dx >= RELATION_MARGIN and -dx >= abs(dy)
    if relation == "above":
        return dy >= RELATION_MARGIN and dy >= abs(dx)
    if relation == "below":
        return -dy >= RELATION_MARGIN and -dy >= abs(dx)
    raise ValueError(f"Unknown relation {relation!r}; expected one of {RELATIONS}.")


def _matches(obj: dict[str, Any], clause: dict[str, Any], with_color: bool) -> bool:
    return obj["shape"] == clause["shape"] and (not with_color or obj["color"] == clause["color"])


def _count_credit(want: int, found: int) -> float:
    return max(0.0, 1.0 - abs(want - found) / want)


def _check_metadata(meta: Metadata) -> None:
    objects = meta.get("objects")
    if not objects:
        raise ValueError(f"Metadata needs a non-empty 'objects' list; got {meta!r}.")
    for clause in objects:
        if clause.get("shape") not in SHAPES or int(clause.get("count", 0)) < 1:
            raise ValueError(f"Bad object clause {clause!r}: 'shape' must be one of {SHAPES} and 'count' >= 1.")
        if clause.get("color") is not None and clause["color"] not in PALETTE:
            raise ValueError(f"Bad object clause {clause!r}: 'color' must be None or one of {_COLOR_NAMES}.")
    if meta.get("relation") is not None and len(objects) != 2:
        raise ValueError(f"A relation needs exactly two object clauses; got {meta!r}.")


def score_objects(objects: list[dict[str, Any]], meta: Metadata) -> dict[str, float]:
    """Score detections against prompt metadata: ``{"score": partial credit, "strict": 0/1}``."""
    _check_metadata(meta)
    credits = []
    for clause in meta["objects"]:
        want = int(clause["count"])
        credits.append(_count_credit(want, sum(_matches(o, clause, False) for o in objects)))
        if clause.get("color"):
            credits.append(_count_credit(want, sum(_matches(o, clause, True) for o in objects)))
    if meta.get("relation"):
        first, second = meta["objects"]
        pairs = [
            (a, b)
            for a in objects
            if _matches(a, first, bool(first.get("color")))
            for b in objects
            if b is not a and _matches(b, second, bool(second.get("color")))
        ]
        credits.append(float(any(_relation_holds(a, b, meta["relation"]) for a, b in pairs)))
    return {"score": float(np.mean(credits)), "strict": float(all(c == 1.0 for c in credits))}


def quality(image: torch.Tensor | np.ndarray) -> dict[str, float]:
    """A prompt-independent quality measure of one image ``[3, H, W]`` in [0, 1].

    ``clean_fraction``: pixels within :data:`COLOR_THRESHOLD` of the palette or the background (anti-aliased
    edges of clean renders are mostly within it). ``speckle_fraction``: coloured pixels that a 3x3 opening
    removes, i.e. isolated dots and one-pixel lines. ``quality = clean_fraction * (1 - speckle_fraction)``.
    """
    labels = _nearest_labels(_check_images(image[None])[0])
    colored = labels > 0
    kept = np.zeros_like(colored)
    for index in range(1, len(_COLOR_NAMES) + 1):
        kept |= ndimage.binary_opening(labels == index, structure=_OPENING)
    clean = float((labels >= 0).mean())
    speckle = float((colored & ~kept).sum() / max(1, colored.sum()))
    return {"clean_fraction": clean, "speckle_fraction": speckle, "quality": clean * (1.0 - speckle)}


def score_image(image: torch.Tensor | np.ndarray, meta: Metadata | str) -> dict[str, float]:
    """Score one image ``[3, H, W]`` against a prompt (or its metadata): ``score``, ``strict`` and ``quality``."""
    if isinstance(meta, str):
        meta = parse_prompt(meta)
    return {**score_objects(detect_objects(image), meta), "quality": quality(image)["quality"]}


SOFT_COLOR_WIDTH = 0.15  # RGB distance scale of soft_color_reward's Gaussian kernel


def soft_color_reward(prompts: list[str], images: torch.Tensor, **kwargs) -> torch.Tensor:
    """A differentiable reward for gradient diagnostics: how much of each colour the prompt names is in the image.

    Per image, the mean over the prompt's colours (every palette colour if it names none) of the soft area fraction
    ``mean_pixels exp(-|p - c|^2 / (2 w^2))`` (w = 0.15), times 10. Unlike `ShapesReward` it has a gradient with
    respect to the pixels (and so, through the VAE, to the latents). Returns `[B]`.
    """
    palette = torch.tensor(list(PALETTE.values()), dtype=images.dtype, device=images.device)  # [K, 3]
    pixels = images.permute(0, 2, 3, 1)  # [B, H, W, 3]
    kernel = torch.exp(-((pixels[..., None, :] - palette) ** 2).sum(-1) / (2 * SOFT_COLOR_WIDTH**2))  # [B,H,W,K]
    area = kernel.flatten(1, 2).mean(dim=1)  # [B, K]
    rewards = []
    for b, prompt in enumerate(prompts):
        named = [o["color"] for o in parse_prompt(prompt)["objects"] if o["color"]]
        index = [_COLOR_NAMES.index(c) for c in named] or list(range(len(_COLOR_NAMES)))
        rewards.append(area[b, index].mean() * 10)
    return torch.stack(rewards)


def score_batch(images: torch.Tensor | np.ndarray, metas: list[Metadata | str]) -> dict[str, list]:
    """Score a batch: per-sample lists ``score``, ``strict``, ``quality`` and ``tag``."""
    images = _check_images(images).transpose(0, 3, 1, 2)
    if len(images) != len(metas):
        raise ValueError(f"Got {len(images)} images but {len(metas)} prompts/metadata rows; they must match.")
    out: dict[str, list] = defaultdict(list)
    for image, meta in zip(images, metas):
        if isinstance(meta, str):
            meta = parse_prompt(meta)
        for key, value in score_image(image, meta).items():
            out[key].append(value)
        out["tag"].append(meta.get("tag"))
    return dict(out)


def aggregate(results: dict[str, list]) -> dict[str, float]:
    """Means of :func:`score_batch` results: ``score``, ``strict``, ``quality``, ``score/<tag>``, ``strict/<tag>``."""
    summary = {key: float(np.mean(results[key])) for key in ("score", "strict", "quality")}
    for tag in TAGS:
        picked = [i for i, t in enumerate(results["tag"]) if t == tag]
        if picked:
            summary[f"score/{tag}"] = float(np.mean([results["score"][i] for i in picked]))
            summary[f"strict/{tag}"] = float(np.mean([results["strict"][i] for i in picked]))
    return summary


class ShapesReward:
    """The shapes-world reward: ``reward(prompts, images, **columns) -> list[float]``.

    Uses the dataset's ``objects`` / ``relation`` (and ``tag``) columns when the trainer passes them, otherwise
    parses each prompt. Extra keyword arguments (other columns, ``trainer_state``) are ignored.

    Args:
        strict: return GenEval's strict 0/1 accuracy instead of the partial credit.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.name = "shapes_strict" if strict else "shapes"
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"ShapesReward(strict={self.strict})"

    def __call__(self, prompts: list[str], images: torch.Tensor, objects=None, relation=None, tag=None,
                 **kwargs) -> list[float]:
        if isinstance(prompts, str):
            raise ValueError("`prompts` must be a list of strings, one per image, not a single string.")
        pixels = _check_images(images)
        if len(pixels) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(pixels)} images; they must match.")
        for name, column in (("objects", objects), ("relation", relation), ("tag", tag)):
            if column is not None and len(column) != len(prompts):
                raise ValueError(f"Column {name!r} has {len(column)} entries for {len(prompts)} prompts.")
        key = "strict" if self.strict else "score"
        rewards = []
        for i, (prompt, image) in enumerate(zip(prompts, pixels.transpose(0, 3, 1, 2))):
            if objects is not None:
                meta = {"objects": objects[i], "relation": relation[i] if relation is not None else None}
            else:
                meta = parse_prompt(prompt)
            rewards.append(score_objects(detect_objects(image), meta)[key])
        return rewards


def shapes_quality(prompts: list[str], images: torch.Tensor, **kwargs) -> list[float]:
    """The prompt-independent :func:`quality` of each image as a reward function (built-in name
    ``"shapes_quality"``). With weight 0 in `reward_weights` it is only logged, so training curves show it."""
    pixels = _check_images(images)
    if len(pixels) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(pixels)} images; they must match.")
    return [quality(image)["quality"] for image in pixels.transpose(0, 3, 1, 2)]
