"""The replayed SDE transition of the SDE trainers and the KL between two policies' steps from it.

Shared by [`DanceGRPOTrainer`] (its `kl_type="sde_mean"` KL), [`FlowOPDTrainer`] (the KL to a teacher) and the
[`ManifoldAnchorMixin`] (the KL to its anchor) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..sampling import StepOutput


def sde_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL between two step policies with the same std: ``mean_dims (mu - mu_ref)^2 / (2 s_t^2)`` with
    ``s_t^2 = std^2 / (-dt)`` (the true Gaussian KL summed over dims and without the ``|dt|`` factor). `std` is the
    step's per-sample std ``[B, 1, ...]``, `dt` ``[B]`` (negative). Returns `[B]`."""
    dims = tuple(range(1, mean.dim()))
    s2 = std.float().flatten(1)[:, 0] ** 2 / (-dt.float().view(-1))  # std is per sample, [B, 1, ...]
    return (mean.float() - ref_mean.float().detach()).pow(2).mean(dims) / (2 * s2)


@dataclass
class Transition:
    """The trained transition ``x_j -> x_{j+1}`` of each sample of a loss chunk, replayed under the current policy.

    Args:
        rows (`Tensor`): `[B]` sample indices in the micro-batch.
        steps (`Tensor`): `[B]` indices into the sample's recorded transitions.
        latents (`Tensor`): `[B, ...]` states ``x_j``.
        next_latents (`Tensor`): `[B, ...]` sampled states ``x_{j+1}``.
        sigma (`Tensor`), sigma_next (`Tensor`): `[B]` the transition's sigmas.
        cond (`dict`): the samples' conditioning.
        velocity (`Tensor`): the policy's guided velocity at ``x_j`` (with grad).
        out ([`StepOutput`]): the policy's step: `mean` (with grad), `std`, `log_prob` of ``x_{j+1}``.
        replay (`Callable`): the rollout's stochastic step ``(latents, velocity, sigma, sigma_next, next_latents) ->
            StepOutput``, to replay the transition with another network's velocity.
    """

    rows: torch.Tensor
    steps: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    cond: dict[str, torch.Tensor]
    velocity: torch.Tensor
    out: StepOutput
    replay: Callable[..., StepOutput]


def transition_kl(transition: Transition, other_velocity: torch.Tensor) -> torch.Tensor:
    """`[B]` SDE-mean KL (`sde_mean_kl`) of the policy's step to the step another network (`other_velocity`,
    detached) takes from the same state; gradient flows through the policy's mean."""
    t = transition
    other = t.replay(t.latents, other_velocity, t.sigma, t.sigma_next, t.next_latents)
    return sde_mean_kl(t.out.mean, other.mean, t.out.std, t.sigma_next - t.sigma)


__all__ = ["Transition", "sde_mean_kl", "transition_kl"]
