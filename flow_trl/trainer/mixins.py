"""Regularizer mixins: compose with any velocity-local trainer by inheritance.

    class MyTrainer(NormGuardMixin, FlowNFTTrainer): ...

A mixin extends `_velocity_regularization(v, v_ref)` (the terms computed against the reference velocity at the
same inputs) and `_needs_reference()`; the trainer adds the result to its loss at every trained timestep.
"""

from __future__ import annotations

import torch

from ..regularizers import norm_guard


class NormGuardMixin:
    """NormGuard (papers/normguard.md, eq. 7-8): a hinge on the policy's velocity norm above the reference's.

    ``R = norm_guard_coef * mean_b max(0, (|v|^2 - |v_ref|^2) / |v_ref|^2)``, zero while the trained velocity is
    no larger than the base model's at the same ``(x_t, sigma, c)``; its gradient only shrinks ``|v|``. Configure it
    with `norm_guard_coef` (0 disables it and skips the reference forward it would need).
    """

    def _needs_reference(self) -> bool:
        return self.args.norm_guard_coef > 0 or super()._needs_reference()

    def _velocity_regularization(self, v: torch.Tensor, v_ref: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, metrics = super()._velocity_regularization(v, v_ref)
        if self.args.norm_guard_coef == 0:
            return loss, metrics
        guard, guard_metrics = norm_guard(v, v_ref, self.args.norm_guard_coef)
        return loss + guard, {**metrics, **guard_metrics}
