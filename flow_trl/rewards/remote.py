"""A reward computed by an HTTP server: for reward models whose dependencies do not fit in the training environment.

Protocol (JSON over HTTP POST, one request per chunk of ``batch_size`` images):

- request: ``{"prompts": [str], "images": [base64 PNG], "columns": {name: [value per image]}}``;
- response: ``{"rewards": [float | null]}`` with one entry per image (``null`` abstains).

``examples/reward_server.py`` serves any built-in reward this way.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import RewardModel, to_pil


def encode_images(images: torch.Tensor) -> list[str]:
    """``[B, 3, H, W]`` in [0, 1] -> base64 PNG strings (lossless after uint8 rounding)."""
    encoded = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_images(encoded: Sequence[str]) -> torch.Tensor:
    """Inverse of :func:`encode_images`: base64 PNGs (all the same size) -> ``[B, 3, H, W]`` float in [0, 1]."""
    arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")) for s in encoded]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def parse_rewards(body: bytes, expected: int) -> list[float | None]:
    """Validate a server response: a JSON object whose ``rewards`` holds ``expected`` finite numbers or nulls."""
    try:
        rewards = json.loads(body)["rewards"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f'Malformed reward server response (expected {{"rewards": [...]}}): {body[:200]!r}') from None
    if not isinstance(rewards, list) or len(rewards) != expected:
        got = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
        raise ValueError(f"The reward server returned {got} rewards for {expected} images; it must return one each.")
    for value in rewards:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or math.isinf(value)):
            raise ValueError(f"The reward server returned {value!r}; rewards must be finite numbers or null.")
    return rewards


class RemoteReward(RewardModel):
    """POST prompts and PNG images to a reward server; retries server errors and timeouts with bounded backoff.

    HTTP 5xx answers, timeouts and refused connections are retried ``max_retries`` times, waiting
    ``backoff * 2**attempt`` seconds before retry ``attempt`` (0-based); then a `RuntimeError` names the last error.
    HTTP 4xx answers and malformed responses fail at once (a retry would not fix them).

    Args:
        url: the server's scoring endpoint, e.g. ``"http://127.0.0.1:8000/score"``.
        timeout: seconds to wait for one response.
        max_retries: retries after the first attempt.
        backoff: base wait in seconds between retries.
        columns: dataset columns sent along (JSON-serialisable, one entry per image), e.g. ``("objects",)``.
        name: the name logged for this reward (repeated names get suffixes ``_1``, ``_2``, ... in the trainer).
        batch_size: images per request.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        columns: Sequence[str] = (),
        name: str = "remote",
        batch_size: int = 64,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"`url` must start with http:// or https://; got {url!r}.")
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError("`timeout` must be > 0 and `max_retries`, `backoff` >= 0.")
        self.name = name
        self.columns = tuple(columns)
        super().__init__(device="cpu", batch_size=batch_size)
        self.url = url
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, batch_size={self.batch_size})"

    def _post(self, payload: bytes) -> bytes:
        request = urllib.request.Request(self.url, data=payload, headers={"Content-Type": "application/json"})
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                if err.code < 500:
                    detail = err.read()[:200].decode(errors="replace")
                    raise RuntimeError(
                        f"Reward server {self.url} rejected the request: HTTP {err.code} {detail}"
                    ) from None
                error: Exception = err
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                error = err
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt)
        raise RuntimeError(f"Reward server {self.url} failed after {self.max_retries + 1} attempts: {error}")

    def _score(self, prompts: list[str], images: torch.Tensor, **columns: list[Any]) -> list[float | None]:
        columns = {name: list(values) for name, values in columns.items()}
        body = {"prompts": prompts, "images": encode_images(images), "columns": columns}
        return parse_rewards(self._post(json.dumps(body).encode()), expected=len(prompts))
