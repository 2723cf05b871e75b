"""Step functions for rectified-flow sampling and the rollout loop that records what RL training needs.

Conventions (SD3/FLUX rectified flow): ``x_sigma = (1 - sigma) x0 + sigma * noise`` with sigma in [0, 1], sigma = 1
is pure noise, the model predicts ``v ~ noise - x0`` and the Euler ODE step is ``x' = x + (sigma' - sigma) v`` with
``sigma' < sigma``. The velocity comes from a callable, so nothing here depends on a model family.

Three conventions shared with the reference implementations (docs/algorithms.md#log-probs, #precision):

- **Log-probs are means over the non-batch dimensions**, not sums. PPO ratios are therefore per-dimension ratios,
  which is why Flow-GRPO's clip range is as small as 1e-4. Changing this would silently change every clip range.
- **All step math is fp32.** Latents, velocity and sigmas are cast to float32 first (bf16 overflows in the
  Flow-SDE mean).
- **Storage-dtype round trip.** The sampled next latent is cast to the storage dtype (the dtype of the input
  latents) *before* its log-prob is taken, so the log-prob recorded at rollout and the one recomputed at training
  time (replay, with ``prev_sample``) see exactly the same bits and the PPO ratio starts at 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


STEP_TYPES = ("ode", "flow_sde", "dance_sde", "cps")


@dataclass(frozen=True)
class NoiseLevelRange:
    """The noise levels eta for which a stochastic step type is a proper Gaussian policy, each eta a distinct one:
    ``0 < eta <= high`` (eta = 0 is the deterministic ODE step for every type: zero std, no log-prob)."""

    high: float
    reason: str

    def __str__(self) -> str:
        return f"0 < eta <= {self.high:g}" if math.isfinite(self.high) else "0 < eta < inf"


_SCALES_THE_STD = "eta scales the step's std; 0 gives zero std (sde_type='ode' is the deterministic step)."
# Valid noise levels of each stochastic step type (the formulas are in `step`); "ode" ignores the noise level.
NOISE_LEVEL_RANGES: dict[str, NoiseLevelRange] = {
    # std = eta sqrt(sigma / (1 - sigma)) sqrt(-dt): any positive eta is an SDE with the ODE's marginals (a large eta
    # discretises coarsely; Flow-GRPO uses 0.7)
    "flow_sde": NoiseLevelRange(math.inf, _SCALES_THE_STD),
    # std = eta sqrt(sigma - sigma_next), the drift corrected by eta^2 / 2 times the score: any positive eta
    "dance_sde": NoiseLevelRange(math.inf, _SCALES_THE_STD),
    # std = sigma_next sin(eta pi / 2), kept signal sqrt(sigma_next^2 - std^2) = sigma_next |cos(eta pi / 2)|
    "cps": NoiseLevelRange(
        1.0,
        "The CPS std is sigma_next sin(eta pi / 2): 1 is pure noise; eta in (1, 2) repeats 2 - eta (1.5 acts as "
        "0.5), 2 gives zero std and values above 2 a negative one.",
    ),
}


def check_noise_level(step_type: str, noise_level: float) -> None:
    """Raise a `ValueError` naming the valid range unless `noise_level` is meaningful for `step_type` (any value
    passes for `"ode"`, which ignores it)."""
    valid = NOISE_LEVEL_RANGES.get(step_type)
    if valid is None or (math.isfinite(noise_level) and 0 < noise_level <= valid.high):
        return
    bound = f"positive and at most {valid.high:g}" if math.isfinite(valid.high) else "positive and finite"
    raise ValueError(
        f"noise_level (eta) must be {bound} for the {step_type!r} step (valid: {valid}); got {noise_level}. "
        f"{valid.reason}"
    )


@dataclass
class StepOutput:
    """Result of one sampling step.

    Args:
        prev_sample (`Tensor`): the next latent, in the storage dtype (the dtype of the input latents).
        log_prob (`Tensor` or `None`): `[B]` fp32 Gaussian log-prob of `prev_sample`, mean over non-batch dims;
            `None` for `"ode"`.
        mean (`Tensor`): fp32 mean of the step's Gaussian (the Euler next latent for `"ode"`).
        std (`Tensor`): fp32 std broadcastable to the latents (`[B, 1, ...]`); zeros for `"ode"`.
    """

    prev_sample: Tensor
    log_prob: Tensor | None
    mean: Tensor
    std: Tensor


@dataclass
class Rollout:
    """A sampled trajectory, reduced to what training needs.

    Args:
        latents (`Tensor`): final latents `[B, ...]` in the storage dtype.
        step_indices (`list[int]`): ascending indices `j` of the recorded (stochastic) transitions.
        latents_before (`Tensor` or `None`): `[B, K, ...]` states `x_j` of the recorded steps (`None` when K == 0).
        latents_after (`Tensor` or `None`): `[B, K, ...]` states `x_{j+1}`.
        log_probs (`Tensor` or `None`): `[B, K]` fp32 log-probs of the recorded transitions.
        sigmas (`Tensor`): the full grid used, `[N + 1]` fp32 ending in 0.
    """

    latents: Tensor
    step_indices: list[int]
    latents_before: Tensor | None
    latents_after: Tensor | None
    log_probs: Tensor | None
    sigmas: Tensor


def shift_sigmas(u: Tensor, shift: float) -> Tensor:
    """Static SD3 timestep shift ``s u / (1 + (s - 1) u)`` (identity for ``shift == 1``)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive; got {shift}.")
    return shift * u / (1 + (shift - 1) * u)


def sigma_grid(num_inference_steps: int, shift: float = 1.0) -> Tensor:
    """Explicit sampling grid ``shift_sigmas(linspace(1, 1/N, N), shift)`` followed by a terminal 0.

    The shift is applied once. (Diffusers' SD3 pipeline with `sigmas=None` shifts a grid that was already built from
    shifted training sigmas, so its low end is shifted twice; we pass this grid explicitly instead.)

    Args:
        num_inference_steps (`int`): number of transitions N.
        shift (`float`, defaults to `1.0`): static shift `s` (SD3.5 uses 3).

    Returns:
        `Tensor`: `[N + 1]` fp32, starting at 1 and ending at 0.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1; got {num_inference_steps}.")
    n = num_inference_steps
    u = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float32)
    return torch.cat([shift_sigmas(u, shift), torch.zeros(1, dtype=torch.float32)])


def _per_sample(value: Tensor | float, latents: Tensor, name: str) -> Tensor:
    """Cast a float, 0-d or `[B]` sigma to fp32 `[B, 1, ...]` with the latents' rank and device."""
    batch = latents.shape[0]
    value = torch.as_tensor(value, dtype=torch.float32, device=latents.device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(
            f"{name} must be a float, a 0-d tensor or a [B] tensor with B={batch}; got shape {tuple(value.shape)}."
        )
    return value.view(batch, *([1] * (latents.ndim - 1)))


def _gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """fp32 ``log N(sample; mean, std^2)`` averaged over the non-batch dimensions -> `[B]`."""
    log_density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(dim=1)


def step(
    step_type: str,
    latents: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float = 0.7,
    *,
    sigma_max: float | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    check_sigmas: bool = True,
) -> StepOutput:
    """One transition ``x_sigma -> x_sigma_next``: Euler (`"ode"`) or a Gaussian policy step with its log-prob.

    Stochastic steps (docs/algorithms.md#step-functions), with ``dt = sigma_next - sigma < 0`` and
    ``eta = noise_level``:

    - `"flow_sde"` (Flow-GRPO): ``s_t = eta sqrt(sigma / (1 - sigma))`` (`sigma_max` replaces sigma in the
      denominator where sigma == 1), ``std = s_t sqrt(-dt)`` and
      ``mean = x (1 + s_t^2 dt / (2 sigma)) + v (1 + s_t^2 (1 - sigma) / (2 sigma)) dt``.
    - `"dance_sde"` (DanceGRPO): ``std = eta sqrt(sigma - sigma_next)``, ``mean = x + dt v - eta^2 score dt / 2`` with
      ``score = -(x - (1 - sigma) x0_hat) / sigma^2`` and ``x0_hat = x - sigma v``.
    - `"cps"` (coefficients-preserving): ``std = sigma_next sin(eta pi / 2)``,
      ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat`` with ``x1_hat = x + (1 - sigma) v``.
      The reference's CPS log-prob is only ``-mean((x' - mean)^2)``; we return the proper Gaussian log-density like
      the other types. The std depends only on the sigmas, so it is shared by the two policies of a ratio and the
      dropped ``log std`` and ``log 2 pi`` terms cancel there; unlike the reference, the exponent of the ratio is
      scaled by ``1 / (2 std^2)``, which makes it a real log-density ratio comparable across step types (the clip
      range then has the same meaning as for the SDE types, not the reference CPS one).

    The log-prob is ``mean_dims[-(x' - mean)^2 / (2 std^2) - log std - log(2 pi) / 2]`` in fp32.

    Args:
        step_type (`str`): one of `STEP_TYPES`.
        latents (`Tensor`): current latents `[B, C, H, W]` or packed `[B, L, D]`; their dtype is the storage dtype.
        velocity (`Tensor`): predicted velocity, same shape as `latents`.
        sigma (`Tensor` or `float`): current sigma, a float, 0-d or `[B]` tensor.
        sigma_next (`Tensor` or `float`): next sigma (`<= sigma`), same forms.
        noise_level (`float`, defaults to `0.7`): eta of the stochastic step types (ignored by `"ode"`).
        sigma_max (`float`, *optional*): for `"flow_sde"`, the sigma used in ``1 - sigma`` where sigma == 1
            (the reference passes the second grid sigma). Required when any sigma equals 1.
        prev_sample (`Tensor`, *optional*): replay mode: no noise is drawn; the log-prob of this next latent is
            returned and `prev_sample` itself is returned unchanged.
        generator (`torch.Generator`, *optional*): source of the fp32 noise (drawn on its device, then moved).
        check_sigmas (`bool`, defaults to `True`): check the values of `sigma` and `sigma_next` (in [0, 1], not
            increasing, a positive std). Each check reads device tensors on the host, a synchronisation: callers that
            step along a grid they validated once (`rollout`, a trainer replaying its own grid) pass `False`.

    Returns:
        [`StepOutput`]
    """
    if step_type not in STEP_TYPES:
        raise ValueError(f"Unknown step_type {step_type!r}; valid step types are {STEP_TYPES}.")
    check_noise_level(step_type, noise_level)
    if velocity.shape != latents.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} must equal latents shape {tuple(latents.shape)}.")
    if prev_sample is not None and prev_sample.shape != latents.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} must equal latents shape {tuple(latents.shape)}."
        )
    sigma = _per_sample(sigma, latents, "sigma")
    sigma_next = _per_sample(sigma_next, latents, "sigma_next")
    if check_sigmas and ((sigma < 0) | (sigma > 1) | (sigma_next < 0) | (sigma_next > 1)).any():
        raise ValueError("sigma and sigma_next must lie in [0, 1] (sigma = 1 is noise, 0 is data).")
    if check_sigmas and (sigma_next > sigma).any():
        raise ValueError("sigma_next must not exceed sigma: sampling goes from noise (sigma = 1) to data (sigma = 0).")
    x = latents.float()
    v = velocity.float()
    dt = sigma_next - sigma

    if step_type == "ode":
        mean = x + dt * v
        out = mean.to(latents.dtype) if prev_sample is None else prev_sample
        return StepOutput(prev_sample=out, log_prob=None, mean=mean, std=torch.zeros_like(sigma))

    if check_sigmas and (sigma_next == 0).any():
        raise ValueError(
            f"A {step_type!r} step to sigma_next == 0 is deterministic in the limit; never take a log-prob of a "
            "deterministic step: make the final transition an ODE step (leave it out of sde_steps)."
        )
    if step_type == "flow_sde":
        if check_sigmas and (sigma == 1).any():
            if sigma_max is None:
                raise ValueError("flow_sde at sigma == 1 divides by 1 - sigma: pass sigma_max (the 2nd grid sigma).")
            if not 0 <= sigma_max < 1:
                raise ValueError(f"sigma_max must lie in [0, 1); got {sigma_max}.")
        sigma_denominator = torch.where(sigma == 1, torch.full_like(sigma, sigma_max or 0.0), sigma)
        std_dev_t = noise_level * torch.sqrt(sigma / (1 - sigma_denominator))
        std = std_dev_t * torch.sqrt(-dt)
    elif step_type == "dance_sde":
        std = noise_level * torch.sqrt(sigma - sigma_next)
    else:  # cps
        std = sigma_next * math.sin(noise_level * math.pi / 2)
    if check_sigmas and not (std > 0).all():
        raise ValueError(
            f"The {step_type!r} step has zero std (noise_level={noise_level}, or sigma_next == sigma); never take a "
            "log-prob of a deterministic step: use step_type='ode' or a positive noise_level."
        )

    if step_type == "flow_sde":
        mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    elif step_type == "dance_sde":
        x0_hat = x - sigma * v
        score = -(x - (1 - sigma) * x0_hat) / sigma**2
        mean = x + dt * v - 0.5 * noise_level**2 * score * dt
    else:  # cps
        x0_hat = x - sigma * v
        x1_hat = x + (1 - sigma) * v
        mean = x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt((sigma_next**2 - std**2).clamp_min(0))

    if prev_sample is None:
        device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
        prev_sample = (mean + std * noise.to(latents.device)).to(latents.dtype)
    log_prob = _gaussian_log_prob(prev_sample.float(), mean, std)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def rollout(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    sigmas: Tensor,
    step_type: str = "ode",
    noise_level: float = 0.7,
    sde_steps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Integrate from `latents` along `sigmas`, stochastic on `sde_steps`, recording only the stochastic transitions.

    Steps whose index is in `sde_steps` use `step_type`; all others are Euler ODE steps. This covers full SDE
    sampling (Flow-GRPO, DanceGRPO), the Flow-GRPO-Fast window (a few consecutive indices) and ODE-only sampling
    (NFT, AWM: `step_type="ode"`, nothing is recorded). Runs under `torch.no_grad()`.

    Args:
        velocity_fn (`Callable[[Tensor, Tensor], Tensor]`): `velocity_fn(x, sigma)` with `sigma` a `[B]` fp32 tensor;
            returns the velocity (wrap CFG and conditioning in it).
        latents (`Tensor`): initial noise `[B, ...]`; its dtype is the storage dtype of the whole trajectory.
        sigmas (`Tensor`): grid `[N + 1]`, strictly decreasing, `sigmas[0] <= 1`, `sigmas[-1] == 0`.
        step_type (`str`, defaults to `"ode"`): step function of the stochastic steps, one of `STEP_TYPES`.
        noise_level (`float`, defaults to `0.7`): eta of the stochastic steps.
        sde_steps (`Sequence[int]`, *optional*): indices `j` of the stochastic transitions `sigmas[j] -> sigmas[j+1]`.
            Defaults to every step but the last for a stochastic `step_type`, none for `"ode"`.
        generator (`torch.Generator`, *optional*): source of the SDE noise.

    Returns:
        [`Rollout`]
    """
    if step_type not in STEP_TYPES:
        raise ValueError(f"Unknown step_type {step_type!r}; valid step types are {STEP_TYPES}.")
    sigmas = torch.as_tensor(sigmas).to(device=latents.device, dtype=torch.float32)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 values; got shape {tuple(sigmas.shape)}.")
    grid = sigmas.tolist()  # the rollout's only read of device values: the steps below trust the checked grid
    if grid[0] > 1 or grid[-1] != 0 or any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("sigmas must be strictly decreasing from at most 1 to exactly 0 (e.g. from sigma_grid).")
    num_steps = len(sigmas) - 1
    if sde_steps is None:
        sde_steps = range(num_steps - 1) if step_type != "ode" else ()
    sde_steps = sorted(set(int(j) for j in sde_steps))
    if sde_steps and step_type == "ode":
        raise ValueError(f"sde_steps={sde_steps} has no effect with step_type='ode'; pass a stochastic step_type.")
    if any(j < 0 or j >= num_steps for j in sde_steps):
        raise ValueError(f"sde_steps must be step indices in [0, {num_steps - 1}]; got {sde_steps}.")
    if num_steps - 1 in sde_steps:
        raise ValueError(
            f"The last transition (index {num_steps - 1}, to sigma 0) cannot be stochastic: its log-prob is "
            "degenerate. Remove it from sde_steps; it is always an ODE step."
        )

    batch = latents.shape[0]
    sigma_max = grid[1]
    x = latents
    before, after, log_probs = [], [], []
    with torch.no_grad():
        for j in range(num_steps):
            v = velocity_fn(x, sigmas[j].expand(batch))
            stochastic = j in sde_steps
            out = step(step_type if stochastic else "ode", x, v, sigmas[j], sigmas[j + 1], noise_level,
                       sigma_max=sigma_max, generator=generator, check_sigmas=False)
            if stochastic:
                before.append(x)
                after.append(out.prev_sample)
                log_probs.append(out.log_prob)
            x = out.prev_sample
    recorded = bool(sde_steps)
    return Rollout(
        latents=x,
        step_indices=sde_steps,
        latents_before=torch.stack(before, dim=1) if recorded else None,
        latents_after=torch.stack(after, dim=1) if recorded else None,
        log_probs=torch.stack(log_probs, dim=1) if recorded else None,
        sigmas=sigmas,
    )
