"""Forward-process training: which sigmas to train on, and how clean latents are noised there.

NFT, AWM and Diffusion-DPO all train on re-noised clean samples ``x_t = (1 - sigma) x0 + sigma eps`` with the
flow-matching target ``eps - x0``; they differ in how the training sigmas are drawn. Every sampler here returns a
``[num_samples, num_timesteps]`` fp32 tensor of sigmas in (0, 1]:

| sampler | draws | used by |
|---|---|---|
| `grid_subset` | per sample, distinct sigmas of the sampling grid in random order | NFT |
| `discrete` | one grid index per stratum of ``[0, int(0.9 T))``, shared by the batch | AWM (PickScore) |
| `discrete_wo_init` | the same on ``[1, int(0.9 T))`` (never sigma = 1) | AWM (GenEval, OCR) |
| `logit_normal` | stratified logit-normal ``u``, shifted by the scheduler shift, at least 0.01, shared | AWM, DPO |
| `uniform` | stratified uniform on [0.2, 1], shared | AWM |

"Shared" samplers give every sample of the batch the same sigmas (AWM trains a micro-batch at one timestep);
pass ``shared=False`` for independent draws per sample (Diffusion-DPO draws one sigma per pair).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import shift_sigmas


TIMESTEP_SAMPLERS = ("grid_subset", "discrete", "discrete_wo_init", "logit_normal", "uniform")
_DISCRETE_END = 0.9  # the discrete samplers stop at int(0.9 T), as the AWM reference does
_UNIFORM_LOW = 0.2
_LOGIT_NORMAL_MIN = 0.01


def _stratified_uniform(rows: int, k: int, generator: torch.Generator) -> Tensor:
    """``[rows, k]`` values, column ``i`` uniform in ``[i / k, (i + 1) / k)``."""
    return (torch.arange(k, dtype=torch.float64) + torch.rand((rows, k), generator=generator, dtype=torch.float64)) / k


def sample_training_sigmas(
    sampler: str,
    num_samples: int,
    num_timesteps: int,
    grid: Tensor,
    generator: torch.Generator,
    shift: float = 1.0,
    shared: bool | None = None,
) -> Tensor:
    """Draw the sigmas each sample is trained at.

    Args:
        sampler (`str`): one of :data:`TIMESTEP_SAMPLERS`.
        num_samples (`int`): rows of the result.
        num_timesteps (`int`): sigmas per sample (columns).
        grid (`Tensor`): the rollout's sigma grid `[T + 1]`, from 1 down to a terminal 0 (see `sigma_grid`).
        generator (`torch.Generator`): CPU generator, so that draws are reproducible and resumable.
        shift (`float`, defaults to `1.0`): static shift applied to `logit_normal` draws (the scheduler's).
        shared (`bool`, *optional*): one draw for the whole batch. Defaults to False for `grid_subset` and True
            for the others (AWM's convention).

    Returns:
        `Tensor`: `[num_samples, num_timesteps]` fp32 sigmas on the grid's device.
    """
    if sampler not in TIMESTEP_SAMPLERS:
        raise ValueError(f"Unknown timestep sampler {sampler!r}; expected one of {TIMESTEP_SAMPLERS}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1; got {num_timesteps}.")
    steps = len(grid) - 1
    shared = sampler != "grid_subset" if shared is None else shared
    rows = 1 if shared else num_samples
    k = num_timesteps
    if sampler == "grid_subset":
        if k > steps:
            raise ValueError(f"Cannot draw {k} distinct sigmas from a grid of {steps} steps.")
        index = torch.stack([torch.randperm(steps, generator=generator)[:k] for _ in range(rows)])
        sigmas = grid.cpu()[index]
    elif sampler in ("discrete", "discrete_wo_init"):
        start = 1 if sampler == "discrete_wo_init" else 0
        end = max(start + 1, int(steps * _DISCRETE_END))
        bounds = torch.linspace(start, end, k + 1, dtype=torch.float64).long()
        width = (bounds[1:] - bounds[:-1]).clamp(min=1)
        offset = (torch.rand((rows, k), generator=generator, dtype=torch.float64) * width).long()
        index = (bounds[:-1] + offset).clamp(max=end - 1)
        sigmas = grid.cpu()[index]
    elif sampler == "logit_normal":
        q = _stratified_uniform(rows, k, generator).clamp(1e-6, 1 - 1e-6)
        u = torch.sigmoid(torch.special.ndtri(q))
        sigmas = shift_sigmas(u, shift).clamp(min=_LOGIT_NORMAL_MIN)
    else:  # uniform
        sigmas = _UNIFORM_LOW + (1 - _UNIFORM_LOW) * _stratified_uniform(rows, k, generator)
    sigmas = sigmas.float()
    if shared:
        sigmas = sigmas.expand(num_samples, k).contiguous()
    return sigmas.to(grid.device)


def noise_latents(x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """The forward process ``x_t = (1 - sigma) x0 + sigma noise`` (fp32), with `sigma` `[B]` broadcast per sample."""
    s = sigma.float().view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0.float() + s * noise.float()


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching velocity target ``noise - x0`` (fp32)."""
    return noise.float() - x0.float()


def flow_matching_mse(velocity: Tensor, target: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-sample ``mean_dims (velocity - target)^2`` computed in `dtype` -> `[B]`."""
    return (velocity.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)


__all__ = ["TIMESTEP_SAMPLERS", "flow_matching_mse", "flow_target", "noise_latents", "sample_training_sigmas"]
