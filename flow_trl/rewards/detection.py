"""A GenEval-style reward on an open-vocabulary detector (OWLv2 from transformers).

GenEval (Ghosh et al. 2023) detects objects with Mask2Former, classifies their colour with CLIP and checks the
prompt's clauses. This reward keeps GenEval's clause logic and its training reward (flow_grpo's ``scores``: the mean
of per-clause credits) but detects with OWLv2 text queries, so any object noun works. Our choices, not GenEval's:
colour is checked by querying the detector with the coloured phrase (``"a photo of a red dog"``) instead of a CLIP
colour classifier on crops; a detection counts when its sigmoid score reaches ``threshold`` (0.1 by default, the
value of OWLv2's own examples) after per-query non-maximum suppression at IoU ``nms_iou``.

Metadata is `flow_trl.rewards.geneval`'s: an ``objects`` column of clauses ``{"shape": noun, "color": colour or
None, "count": n}`` and a ``relation`` column (``None`` or one of ``"left of"``, ``"right of"``, ``"above"``,
``"below"``, reading "objects[0] <relation> objects[1]"). Without these columns each prompt is parsed in GenEval's
grammar (`parse_geneval_prompt`: "a photo of two wine glasses", "a photo of a dog right of a teddy bear", ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import RewardModel, to_pil
from .geneval import check_metadata, make_clause, noun_phrase, parse_geneval_prompt


OWLV2_MODEL = "google/owlv2-base-patch16-ensemble"
POSITION_THRESHOLD = 0.1  # GenEval: centres must differ by more than 0.1 x the summed box sizes along an axis


def relative_position(box_a: np.ndarray, box_b: np.ndarray, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relations of box ``a`` to box ``b`` (``xyxy``, y down): a subset of `geneval.RELATIONS`.

    The centre offset along each axis shrinks by ``threshold * (size_a + size_b)`` on that axis; a relation holds
    when the shrunk offset, divided by the length of the full offset, exceeds 0.5 along its axis.
    """
    boxes = np.asarray([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = boxes[:, 1] - boxes[:, 0]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {relation for relation, holds in found.items() if holds}


def phrase(item: dict[str, Any], with_color: bool) -> str:
    """The detector's text query for a clause: ``"a photo of a/an [colour] noun"``."""
    return "a photo of " + noun_phrase(make_clause(item["shape"], item["color"] if with_color else None))


def queries(meta: dict[str, Any]) -> list[str]:
    """The distinct text queries a prompt's metadata needs, in clause order."""
    needed = []
    for clause in meta["objects"]:
        needed.append(phrase(clause, False))
        if clause.get("color"):
            needed.append(phrase(clause, True))
    return list(dict.fromkeys(needed))


def geneval_score(detections: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, float]:
    """GenEval's credits from detections ``{query: boxes [n, 4] xyxy}``: ``{"score": mean credit, "strict": 0/1}``.

    Per clause, a count credit ``max(0, 1 - |count - found| / count)`` over the uncoloured query's boxes and, when
    the clause has a colour, the same credit over the coloured query's boxes; a relation adds a 0/1 credit that
    holds if some box of the first clause stands in the relation to some box of the second.
    """
    check_metadata(meta)
    credits = []
    for clause in meta["objects"]:
        want = int(clause["count"])
        for with_color in (False, True) if clause.get("color") else (False,):
            found = len(detections.get(phrase(clause, with_color), ()))
            credits.append(max(0.0, 1.0 - abs(want - found) / want))
    if meta.get("relation"):
        first, second = (detections.get(phrase(c, bool(c.get("color"))), ()) for c in meta["objects"])
        credits.append(float(any(meta["relation"] in relative_position(a, b) for a in first for b in second)))
    return {"score": float(np.mean(credits)), "strict": float(all(c == 1.0 for c in credits))}


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[n, n]`` of ``xyxy`` boxes ``[n, 4]``."""
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    return inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first."""
    order = scores.argsort(descending=True)
    overlaps = box_iou(boxes[order])
    keep: list[int] = []
    for i in range(len(order)):
        if all(overlaps[i, j] <= iou for j in keep):
            keep.append(i)
    return order[keep]


class DetectorReward(RewardModel):
    """GenEval-style partial-credit (or strict 0/1) reward from OWLv2 detections, in [0, 1].

    Args:
        model: OWLv2 weights (and processor) id or path.
        threshold: smallest sigmoid score of a detection.
        nms_iou: detections of one query overlapping a better one by more than this IoU are dropped.
        strict: return GenEval's strict 0/1 accuracy instead of the partial credit (the training reward).
        device, dtype, batch_size: see `RewardModel`.
    """

    name = "geneval_owlv2"
    columns = ("objects", "relation")

    def __init__(
        self, model: str = OWLV2_MODEL, threshold: float = 0.1, nms_iou: float = 0.5, strict: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        if not 0.0 <= threshold <= 1.0 or not 0.0 <= nms_iou <= 1.0:
            raise ValueError(f"`threshold` and `nms_iou` must be in [0, 1]; got {threshold} and {nms_iou}.")
        self.model_name_or_path = model
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.strict = strict

    def _load(self) -> None:
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        self.processor = AutoProcessor.from_pretrained(self.model_name_or_path)
        self.model = Owlv2ForObjectDetection.from_pretrained(self.model_name_or_path, dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)

    def detect(self, images: torch.Tensor, texts: list[list[str]]) -> list[dict[str, np.ndarray]]:
        """Per image, ``{query: kept boxes [n, 4]}`` in ``xyxy`` coordinates of the padded square, in [0, 1]."""
        inputs = self.processor(
            text=texts, images=to_pil(images), padding="max_length", truncation=True, return_tensors="pt"
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs.to(self.device))
        probs = outputs.logits.float().sigmoid().cpu()  # [b, boxes, max queries]
        cx, cy, w, h = outputs.pred_boxes.float().cpu().unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        found = []
        for b, image_texts in enumerate(texts):
            per_query = {}
            for q, text in enumerate(image_texts):
                hits = probs[b, :, q] >= self.threshold
                kept = nms(boxes[b][hits], probs[b, hits, q], self.nms_iou)
                per_query[text] = boxes[b][hits][kept].numpy()
            found.append(per_query)
        return found

    def _score(
        self, prompts: list[str], images: torch.Tensor, objects: list | None = None, relation: list | None = None
    ) -> list[float]:
        if objects is None:
            metas = [parse_geneval_prompt(prompt) for prompt in prompts]
        else:
            metas = [
                {"objects": o, "relation": relation[i] if relation is not None else None}
                for i, o in enumerate(objects)
            ]
        for meta in metas:
            check_metadata(meta)
        key = "strict" if self.strict else "score"
        detections = self.detect(images, [queries(meta) for meta in metas])
        return [geneval_score(found, meta)[key] for found, meta in zip(detections, metas)]
