"""Small helpers shared by the trainers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


SOFT_UPDATE_SCHEDULES = ("none", "linear", "delayed")


def soft_update_decay(step: int, schedule: str, max_decay: float = 0.5) -> float:
    """The decay `d` of a lagged policy's soft update ``lagged <- d lagged + (1 - d) theta`` at optimizer `step`.

    - ``"none"``: ``d = 0`` (the lagged copy equals the trained policy);
    - ``"linear"``: ``d = min(0.001 step, max_decay)`` (NFT's old policy with 0.5, AWM's EMA adapter with 0.3);
    - ``"delayed"``: ``d = 0`` before step 75, then ``min(0.0075 (step - 75), 0.999)`` (NFT's OCR schedule).
    """
    if schedule == "none":
        return 0.0
    if schedule == "linear":
        return min(0.001 * step, max_decay)
    if schedule == "delayed":
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"Unknown soft-update schedule {schedule!r}; expected one of {SOFT_UPDATE_SCHEDULES}.")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put `module` in eval mode (no dropout) for the block and restore its previous train/eval mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
