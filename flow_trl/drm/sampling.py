"""Step-wise sampling (training-free): at each step one policy forward, K SDE branches, the DRM keeps the best.

The step rule is the paper's ("at each denoising step we explore multiple SDE branches and let DRM greedily steer
the trajectory"); ours (docs/algorithms.md#stepwise-sampling): the K branches share one velocity and differ only by
their SDE noise, ``x^(k) = mean + std z_k``; each is scored at its next noise level ``sigma_{j+1}``; the last step (to
sigma 0) is a plain ODE step. Cost per image: N generator forwards (as plain sampling) plus ``K (N - 1)`` DRM forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import get_adapter
from ..sampling import check_noise_level, sigma_grid, step


@dataclass
class StepwiseOutput:
    """Result of step-wise sampling.

    Args:
        latents (`Tensor`): final latents `[B, ...]`.
        step_scores (`Tensor`): `[B, N - 1]` DRM score of the kept branch at each branched step.
        num_policy_forwards (`int`): generator forwards per image.
        num_scorer_forwards (`int`): DRM forwards per image.
    """

    latents: Tensor
    step_scores: Tensor
    num_policy_forwards: int
    num_scorer_forwards: int


@torch.no_grad()
def stepwise_sample(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    score_fn: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    sigmas: Tensor,
    num_branches: int = 4,
    step_type: str = "dance_sde",
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
) -> StepwiseOutput:
    """Greedy DRM-guided sampling along `sigmas`.

    Args:
        velocity_fn (`Callable`): ``velocity_fn(x, sigma[B]) -> v`` (conditioning and CFG wrapped in it).
        score_fn (`Callable`): ``score_fn(x, sigma[B]) -> [B]`` scores (a DRM with its conditioning).
        latents (`Tensor`): initial noise `[B, ...]`.
        sigmas (`Tensor`): grid `[N + 1]` from `sigma_grid`.
        num_branches (`int`, defaults to `4`): K SDE branches per step; K = 1 is plain SDE sampling.
        step_type (`str`, defaults to `"dance_sde"`): the stochastic step (see `flow_trl.sampling.step`).
        noise_level (`float`, defaults to `0.7`): its eta (`flow_trl.sampling.NOISE_LEVEL_RANGES`).
        generator (`torch.Generator`, *optional*): source of the branch noise.

    Returns:
        [`StepwiseOutput`]
    """
    if num_branches < 1:
        raise ValueError(f"num_branches must be at least 1; got {num_branches}.")
    if step_type == "ode":
        raise ValueError("Step-wise sampling branches by SDE noise: use a stochastic step_type, not 'ode'.")
    check_noise_level(step_type, noise_level)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    batch, n = latents.shape[0], len(sigmas) - 1
    rows = torch.arange(batch, device=latents.device)
    x, kept = latents, []
    for j in range(n):
        sigma = sigmas[j].expand(batch)
        v = velocity_fn(x, sigma)
        if j == n - 1:  # the transition to sigma 0 is deterministic
            x = step("ode", x, v, sigmas[j], sigmas[j + 1]).prev_sample
            break
        out = step(
            step_type, x, v, sigmas[j], sigmas[j + 1], noise_level, sigma_max=float(sigmas[1]), generator=generator
        )
        device = generator.device if generator is not None else x.device
        noise = torch.randn((num_branches, *x.shape), generator=generator, device=device, dtype=torch.float32)
        branches = (out.mean + out.std * noise.to(x.device)).to(x.dtype)  # [K, B, ...]
        scores = torch.stack([score_fn(b, sigmas[j + 1].expand(batch)) for b in branches])  # [K, B]
        best = scores.argmax(dim=0)
        x = branches[best, rows]
        kept.append(scores[best, rows])
    return StepwiseOutput(
        latents=x,
        step_scores=torch.stack(kept, dim=1) if kept else latents.new_zeros(batch, 0),
        num_policy_forwards=n,
        num_scorer_forwards=num_branches * (n - 1),
    )


class StepwiseSamplingPipeline:
    """A small pipeline-like entry point: `pipe`'s generator steered by a [`DRMReward`] at every step.

    ```python
    from flow_trl.drm import DRMReward, StepwiseSamplingPipeline
    from flow_trl.toy import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    sampler = StepwiseSamplingPipeline(pipe, DRMReward("shapes-drm", pipe))
    images = sampler(["a photo of a red circle"], num_branches=4, generator=torch.Generator().manual_seed(0))
    ```
    """

    def __init__(self, pipe, drm_reward, max_sequence_length: int | None = None):
        self.pipe, self.reward = pipe, drm_reward
        self.adapter = get_adapter(pipe, max_sequence_length)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 10,
        num_branches: int = 4,
        noise_level: float = 0.7,
        step_type: str = "dance_sde",
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
    ):
        """Images ``[B, 3, H, W]`` in [0, 1] (`output_type="pt"`), or the [`StepwiseOutput`] (`"latent"`)."""
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type must be 'pt' or 'latent'; got {output_type!r}.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        resolution = resolution or self.adapter.default_resolution
        cond = self.adapter.encode_prompts(prompts)
        noise = self.adapter.initial_noise(
            len(prompts), resolution, resolution, generator, self.adapter.transformer.dtype
        )
        out = stepwise_sample(
            lambda x, s: self.adapter.velocity(self.adapter.transformer, x, s, cond).float(),
            lambda x, s: self.reward.score_latents(x, s, cond),
            noise,
            sigma_grid(num_inference_steps, self.adapter.scheduler_shift),
            num_branches=num_branches,
            step_type=step_type,
            noise_level=noise_level,
            generator=generator,
        )
        return out if output_type == "latent" else self.adapter.decode(out.latents)


__all__ = ["StepwiseOutput", "StepwiseSamplingPipeline", "stepwise_sample"]
