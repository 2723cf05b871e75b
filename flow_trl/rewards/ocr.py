"""Text-rendering reward: the text between quotes in the prompt against what OCR reads in the image.

Follows flow_grpo's ``ocr.py``: the target is the text between the first pair of ``"`` in the prompt; target and
recognised text are lower-cased with spaces removed; the distance is 0 if the target occurs in the recognised text,
otherwise the Levenshtein distance, capped at the target's length; ``reward = 1 - distance / len(target)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .base import RewardModel, to_uint8


OCRBackend = Callable[[np.ndarray], str]  # ``[H, W, 3]`` uint8 RGB -> all text it reads, in reading order


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes, lower-cased without spaces; None if there is none."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        return None
    return _normalize(parts[1])


def _normalize(text: str) -> str:
    return "".join(text.split()).lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_reward(target: str, recognized: str) -> float:
    """``1 - min(dist, len(target)) / len(target)`` with ``dist = 0`` when ``target`` occurs in ``recognized``."""
    recognized = _normalize(recognized)
    distance = 0 if target in recognized else min(levenshtein(recognized, target), len(target))
    return 1.0 - distance / len(target)


def easyocr_backend(device: torch.device) -> OCRBackend:
    """EasyOCR's English reader (``pip install flow-trl[ocr]``; it downloads its detector/recogniser on first use)."""
    try:
        import easyocr
    except ImportError:
        raise ImportError("OCRReward's default backend needs EasyOCR: pip install 'flow-trl[ocr]'.") from None
    reader = easyocr.Reader(["en"], gpu=device.type == "cuda")
    return lambda image: "".join(reader.readtext(image, detail=0))


class OCRReward(RewardModel):
    """Normalised edit-distance reward for text rendering (flow_grpo's OCR reward), in [0, 1].

    Prompts without quoted text abstain (None). flow_grpo reads the text with PaddleOCR; the default backend here is
    EasyOCR (an optional extra), and any ``backend(image_uint8_hwc) -> str`` can be passed instead.

    Args:
        backend: the OCR callable; default EasyOCR's English reader, built on first use.
        device, batch_size: see `RewardModel`.
    """

    name = "ocr"

    def __init__(
        self, backend: OCRBackend | None = None, device: str | torch.device | None = None, batch_size: int = 32
    ):
        super().__init__(device=device, batch_size=batch_size)
        self.backend = backend

    def _load(self) -> None:
        if self.backend is None:
            self.backend = easyocr_backend(self.device)

    def _score(self, prompts: list[str], images: torch.Tensor) -> list[float | None]:
        rewards: list[float | None] = []
        for prompt, image in zip(prompts, to_uint8(images)):
            target = quoted_text(prompt)
            rewards.append(None if target is None else text_reward(target, self.backend(image)))
        return rewards
