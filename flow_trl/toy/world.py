"""The shapes world: palette, prompts in GenEval's task families, metadata, and deterministic rendering.

Every prompt has machine-readable metadata:

- ``tag``: the GenEval family, one of :data:`TAGS`.
- ``objects``: a list of clauses ``{"shape": str, "color": str | None, "count": int}``.
- ``relation``: ``None`` or one of :data:`RELATIONS`; it reads "objects[0] <relation> objects[1]".

The format is GenEval's (`flow_trl.rewards.geneval`). The same metadata drives the renderer (:func:`render`) and the
scorer (:mod:`flow_trl.toy.scorer`), and :func:`parse_prompt` recovers it from the prompt text alone, so a reward
needs no extra columns.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ..rewards.geneval import NUMBER_WORDS, RELATIONS, TAGS, make_clause, noun_phrase, parse_geneval_prompt


IMAGE_SIZE = 64
BACKGROUND = (0.94, 0.94, 0.94)
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.14, 0.14),
    "green": (0.14, 0.69, 0.22),
    "blue": (0.14, 0.29, 0.88),
    "yellow": (0.92, 0.80, 0.12),
    "purple": (0.59, 0.20, 0.78),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a photo of", "an image of", "a picture of", "a drawing of")
HELD_OUT_FRACTION = 0.25
SPLITS = ("train", "test")

Metadata = dict[str, Any]


def metadata_to_body(meta: Metadata) -> str:
    """The prompt text without its template prefix, e.g. ``"a red circle and a blue square"``."""
    objects = meta["objects"]
    if meta["relation"]:
        return f"{noun_phrase(objects[0])} {meta['relation']} {noun_phrase(objects[1])}"
    return " and ".join(noun_phrase(o) for o in objects)


def _family_bodies(tag: str) -> list[Metadata]:
    ordered_pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if tag == "single_object":
        clauses = [[make_clause(s)] for s in SHAPES]
    elif tag == "colors":
        clauses = [[make_clause(s, c)] for s in SHAPES for c in COLORS]
    elif tag == "two_object":
        clauses = [[make_clause(a), make_clause(b)] for a, b in ordered_pairs]
    elif tag == "counting":
        clauses = [[make_clause(s, None, n)] for s in SHAPES for n in NUMBER_WORDS]
    elif tag == "position":
        return [
            {"tag": tag, "objects": [make_clause(a), make_clause(b)], "relation": rel}
            for a, b in ordered_pairs
            for rel in RELATIONS
        ]
    elif tag == "color_attr":
        clauses = [
            [make_clause(a, ca), make_clause(b, cb)]
            for a, b in ordered_pairs
            for ca in COLORS
            for cb in COLORS
            if ca != cb
        ]
    else:
        raise ValueError(f"Unknown tag {tag!r}; expected one of {TAGS}.")
    return [{"tag": tag, "objects": c, "relation": None} for c in clauses]


def all_prompts() -> list[Metadata]:
    """Every prompt of the world (both splits), each a metadata dict with its ``prompt`` text."""
    rows = []
    for tag in TAGS:
        for meta in _family_bodies(tag):
            body = metadata_to_body(meta)
            for template in TEMPLATES:
                rows.append({"prompt": f"{template} {body}", **meta})
    return rows


def split_prompts(split: str) -> list[Metadata]:
    """Prompts of one split. Within each family, a fixed hash order puts ~25% of prompts in ``"test"``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS} ('test' is the held-out split).")
    rows = all_prompts()
    out = []
    for tag in TAGS:
        family = [r for r in rows if r["tag"] == tag]
        family.sort(key=lambda r: hashlib.sha256(r["prompt"].encode()).hexdigest())
        n_test = max(1, round(HELD_OUT_FRACTION * len(family)))
        out += family[:n_test] if split == "test" else family[n_test:]
    return out


def balance_families(rows: list[Metadata]) -> list[Metadata]:
    """Repeat each GenEval family's rows cyclically up to the size of the largest family (families in `TAGS` order)."""
    families = [family for family in ([r for r in rows if r["tag"] == tag] for tag in TAGS) if family]
    size = max(len(family) for family in families)
    return [family[i % len(family)] for family in families for i in range(size)]


def shapes_dataset(split: str = "train", balanced: bool = False):
    """A :class:`datasets.Dataset` with columns ``prompt``, ``tag``, ``objects``, ``relation``.

    ``split`` is ``"train"`` or ``"test"`` (held-out); the two share no prompt. With ``balanced``, every family's
    prompts are repeated up to the size of the largest family (`balance_families`), so that uniform sampling of
    rows trains the six families equally often, as the evaluation weighs them; the train split itself is 68%
    ``color_attr`` and 1.7% ``single_object``.
    """
    from datasets import Dataset

    rows = split_prompts(split)
    return Dataset.from_list(balance_families(rows) if balanced else rows)


def shapes_preference_dataset(split: str = "train", num_pairs: int | None = None, seed: int = 0):
    """A preference dataset in TRL's format: ``prompt``, ``chosen`` and ``rejected`` images (PIL), and ``tag``.

    ``chosen`` is a ground-truth rendering of the prompt; ``rejected`` renders another prompt of the same family
    (a wrong shape, colour, count or relation) with the same seed, hence the same kind of layout. Row ``i`` uses
    prompt ``i % len(split)`` and seed ``seed + i``; `num_pairs` defaults to one pair per prompt.
    """
    from datasets import Dataset
    from PIL import Image

    rows = split_prompts(split)
    by_tag = {tag: [r for r in rows if r["tag"] == tag] for tag in TAGS}
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(rows) if num_pairs is None else num_pairs):
        row = rows[i % len(rows)]
        others = [r for r in by_tag[row["tag"]] if metadata_to_body(r) != metadata_to_body(row)]
        other = others[rng.integers(len(others))]
        images = [render(meta, seed + i) for meta in (row, other)]
        chosen, rejected = (Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                            for im in images)
        out.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "tag": row["tag"]})
    return Dataset.from_list(out)


def parse_prompt(prompt: str) -> Metadata:
    """Recover ``{"tag", "objects", "relation"}`` from a shapes-world prompt: GenEval's grammar
    (`flow_trl.rewards.geneval.parse_geneval_prompt`) over the shapes, the palette and the world's templates.

    Raises:
        ValueError: if the prompt is not in the shapes-world grammar.
    """
    return parse_geneval_prompt(prompt, templates=TEMPLATES, colors=COLORS, nouns=SHAPES, require_template=False,
                                grammar="shapes-world")


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4
_GAP = 5.0  # minimum empty pixels between two objects, so they stay separate blobs
_MIN_RADIUS, _MAX_RADIUS = 6.0, 9.0  # half-extent of an object in pixels at 64x64


def _layout_relation_ok(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay  # image y grows downwards
    if relation == "left of":
        return dx >= 16 and abs(dy) <= dx / 2
    if relation == "right of":
        return -dx >= 16 and abs(dy) <= -dx / 2
    if relation == "above":
        return dy >= 16 and abs(dx) <= dy / 2
    if relation == "below":
        return -dy >= 16 and abs(dx) <= -dy / 2
    raise ValueError(f"Unknown relation {relation!r}; expected one of {RELATIONS}.")


def sample_layout(meta: Metadata, seed: int, size: int = IMAGE_SIZE) -> list[dict[str, Any]]:
    """Place the objects a prompt asks for: a list of ``{shape, color, cx, cy, r}`` (pixels), deterministic."""
    rng = np.random.default_rng(seed)
    scale = size / IMAGE_SIZE
    specs = []
    for obj in meta["objects"]:
        for _ in range(obj["count"]):
            color = obj["color"] or COLORS[rng.integers(len(COLORS))]
            specs.append({"shape": obj["shape"], "color": color})
    for _attempt in range(1000):
        placed = []
        for spec in specs:
            r = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * scale
            lo, hi = r + 2 * scale, size - r - 2 * scale
            placed.append({**spec, "cx": rng.uniform(lo, hi), "cy": rng.uniform(lo, hi), "r": r})
        separated = all(
            np.hypot(p["cx"] - q["cx"], p["cy"] - q["cy"]) >= p["r"] + q["r"] + _GAP * scale
            for i, p in enumerate(placed)
            for q in placed[i + 1 :]
        )
        related = not meta["relation"] or _layout_relation_ok(
            (placed[0]["cx"] / scale, placed[0]["cy"] / scale),
            (placed[1]["cx"] / scale, placed[1]["cy"] / scale),
            meta["relation"],
        )
        if separated and related:
            return placed
    raise RuntimeError(f"Could not lay out {meta} at size {size}.")


def _shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    if shape == "square":
        h = 0.88 * r  # equal-area-ish to the circle, keeps the three shapes a similar size
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        # upward isosceles triangle inscribed in the [cx-r, cx+r] x [cy-r, cy+r] box
        t = (ys - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * r)
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def render_layout(layout: list[dict[str, Any]], size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased rendering of a layout: float32 array ``[size, size, 3]`` in [0, 1]."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)
    image = np.empty((n, n, 3), dtype=np.float32)
    image[:] = BACKGROUND
    for obj in layout:
        image[_shape_mask(obj["shape"], obj["cx"], obj["cy"], obj["r"], xs, ys)] = PALETTE[obj["color"]]
    return image.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))


def render(meta: Metadata | str, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render a ground-truth image for a prompt (or its metadata): ``[3, size, size]`` float in [0, 1]."""
    if isinstance(meta, str):
        meta = parse_prompt(meta)
    return torch.from_numpy(render_layout(sample_layout(meta, seed, size), size)).permute(2, 0, 1).contiguous()


def render_batch(metas: list[Metadata | str], seeds: list[int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render several prompts: ``[B, 3, size, size]``."""
    if len(metas) != len(seeds):
        raise ValueError(f"Got {len(metas)} prompts but {len(seeds)} seeds.")
    return torch.stack([render(m, s, size) for m, s in zip(metas, seeds)])
