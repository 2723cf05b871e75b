"""`ParameterEMA`: an exponential moving average of the trained weights, for evaluation and the saved model.

Not a policy: no algorithm samples or regularizes with it (NFT's "old" policy and AWM's "ema" adapter are separate
things: docs/algorithms.md#soft-updates and #weight-ema).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def ema_decay_at(step: int, max_decay: float) -> float:
    """flow_grpo's warm-up ``min((1 + k) / (10 + k), max_decay)`` at 0-based optimizer step `k`: early updates
    follow the weights closely, so the average does not keep the initial weights for hundreds of steps."""
    return min((1 + step) / (10 + step), max_decay)


class ParameterEMA:
    """An fp32 running average ``ema <- d ema + (1 - d) theta`` of a module's trainable parameters.

    Args:
        module: the trained module; the parameters with `requires_grad` when the EMA is built are averaged (with
            LoRA, the trained adapter's weights).
        decay: the largest decay `d` (see `ema_decay_at`).
        update_interval: update every that many optimizer steps (flow_grpo: 8; NFT, AWM: 1).
    """

    def __init__(self, module: nn.Module, decay: float, update_interval: int = 1):
        if not 0 < decay < 1:
            raise ValueError(f"The EMA decay must be in (0, 1); got {decay}.")
        if update_interval < 1:
            raise ValueError(f"The EMA update interval must be at least 1; got {update_interval}.")
        self.decay = decay
        self.update_interval = update_interval
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("The module has no trainable parameters to average.")
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, global_step: int) -> float | None:
        """Fold the current weights in after optimizer step `global_step` (1-based, as `TrainerState`'s); returns
        the decay used, or None on a step the interval skips."""
        if global_step % self.update_interval:
            return None
        decay = ema_decay_at(global_step - 1, self.decay)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        return decay

    @torch.no_grad()
    def copy_to_module(self) -> None:
        """Overwrite the module's weights with the average."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the module inside the block, the trained ones restored after it."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        self.copy_to_module()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone().contiguous() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"The saved EMA lacks {len(missing)} trained weights, e.g. {missing[:3]}.")
        for name, t in self.shadow.items():
            t.copy_(state[name])


__all__ = ["ParameterEMA", "ema_decay_at"]
