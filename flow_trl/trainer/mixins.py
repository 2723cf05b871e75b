"""Regularizer mixins: compose with any velocity-local trainer by inheritance.

    class MyTrainer(NormGuardMixin, FlowNFTTrainer): ...

A mixin extends `_velocity_regularization(v, v_ref)` (the terms computed against the reference velocity at the
same inputs) or `reference_terms(...)`, and `_needs_reference()`; the trainer adds the result to its loss at every
trained timestep. A mixin comes first in the bases, so that its `super()` calls reach the trainer.
"""

from __future__ import annotations

import torch

from ..regularizers import norm_guard, velocity_kl
from .transitions import transition_kl


class RegularizerMixin:
    """A regularizer a trainer applies when it has this mixin among its bases, switched on by the config field
    `coef_field` (> 0). `check_regularizers` refuses a config that switches on one the trainer does not have."""

    coef_field: str


def supported_regularizers(trainer_class: type) -> tuple[str, ...]:
    """The coefficient fields of the regularizers `trainer_class` applies (one per regularizer mixin in its
    bases), e.g. ``("norm_guard_coef",)`` for [`FlowNFTTrainer`]."""
    return tuple(c.coef_field for c in trainer_class.__mro__
                 if issubclass(c, RegularizerMixin) and "coef_field" in vars(c))


def check_regularizers(trainer_class: type, args) -> None:
    """Refuse `args` that switch on a regularizer `trainer_class` does not apply (it would be silently ignored)."""
    supported = supported_regularizers(trainer_class)
    for mixin in RegularizerMixin.__subclasses__():
        if getattr(args, mixin.coef_field, 0) > 0 and mixin.coef_field not in supported:
            raise ValueError(
                f"{trainer_class.__name__} does not include {mixin.__name__}; set {mixin.coef_field}=0, or compose "
                f"it: `class MyTrainer({mixin.__name__}, {trainer_class.__name__})` (this trainer's regularizers: "
                f"{', '.join(supported) or 'none'})."
            )


class NormGuardMixin(RegularizerMixin):
    """NormGuard (its paper's eq. 7-8; docs/algorithms.md#normguard): a hinge on the velocity norm above the
    reference's.

    ``R = norm_guard_coef * mean_b max(0, (|v|^2 - |v_ref|^2) / |v_ref|^2)``, zero while the trained velocity is
    no larger than the base model's at the same ``(x_t, sigma, c)``; its gradient only shrinks ``|v|``. Configure it
    with `norm_guard_coef` (0 disables it and skips the reference forward it would need).
    """

    coef_field = "norm_guard_coef"

    def _needs_reference(self) -> bool:
        return self.args.norm_guard_coef > 0 or super()._needs_reference()

    def _velocity_regularization(self, v: torch.Tensor, v_ref: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, metrics = super()._velocity_regularization(v, v_ref)
        if self.args.norm_guard_coef == 0:
            return loss, metrics
        guard, guard_metrics = norm_guard(v, v_ref, self.args.norm_guard_coef)
        return loss + guard, {**metrics, **guard_metrics}


class ManifoldAnchorMixin(RegularizerMixin):
    """Manifold Anchor Regularization (MAR, Flow-OPD): a KL of the policy to a task-agnostic anchor, on every sample.

    ``L_MAR = mar_coef * mean_b KL_b(policy || anchor)`` at each trained step, from the same state and conditioning
    (CFG scale and negative prompt included). The anchor is the base model (adapters disabled; its forward is shared
    with the reference's) or, with `mar_adapter`, a LoRA loaded as the frozen named adapter `"mar"` on the same base.
    The KL form follows the trainer:

    - SDE trainers ([`DanceGRPOTrainer`], [`StepGRPOTrainer`], [`FlowOPDTrainer`]), which pass their replayed
      transition: Flow-GRPO's SDE-mean KL ``mean_dims (mu - mu_anchor)^2 / (2 s_t^2)`` (Flow-OPD's L_MAR).
    - velocity-local trainers ([`FlowNFTTrainer`], [`FlowAWMTrainer`], [`FlowDPOTrainer`]):
      ``mean_dims (v - v_anchor)^2``, to which the SDE-mean KL is proportional at a fixed step (our choice: they have
      no SDE step).

    Compose it like NormGuard: ``class MyTrainer(ManifoldAnchorMixin, FlowNFTTrainer)``. Logs `mar/kl`.
    """

    MAR_ADAPTER = "mar"
    coef_field = "mar_coef"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.mar_coef > 0 and self.args.mar_adapter is not None:
            self.policies.load_adapter(self.args.mar_adapter, self.MAR_ADAPTER, purpose="mar_adapter")

    def _needs_reference(self) -> bool:
        base_anchor = self.args.mar_coef > 0 and self.args.mar_adapter is None
        return base_anchor or super()._needs_reference()

    def anchor_velocity(self, latents, sigma, cond, v_ref: torch.Tensor | None = None) -> torch.Tensor:
        """The anchor's guided velocity (no grad); reuses `v_ref` when the anchor is the base model."""
        if self.args.mar_adapter is None and v_ref is not None:
            return v_ref.detach()
        name = "ref" if self.args.mar_adapter is None else self.MAR_ADAPTER
        with torch.no_grad(), self.policy(name) as anchor:
            return self.velocity(anchor, latents, sigma, cond)

    def reference_terms(
        self, latents, sigma, cond, v: torch.Tensor, v_ref: torch.Tensor | None = None, transition=None
    ):
        if self.args.mar_coef == 0:
            return super().reference_terms(latents, sigma, cond, v, v_ref=v_ref, transition=transition)
        v_anchor = self.anchor_velocity(latents, sigma, cond, v_ref)
        if self.args.mar_adapter is None:
            v_ref = v_anchor
        loss = super().reference_terms(latents, sigma, cond, v, v_ref=v_ref, transition=transition)
        if transition is not None:
            kl = transition_kl(transition, v_anchor).mean()
        else:
            kl = velocity_kl(v, v_anchor, 1.0)[0]
        self._log_train_metrics({"mar/kl": kl.detach()})
        return loss + self.args.mar_coef * kl
