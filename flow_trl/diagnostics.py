"""NormGuard's diagnostics (docs/algorithms.md#norm-diagnostics): norm-inflation profiles, inference-time velocity
renormalisation, and the adjoint norm-scaling sensitivity S(t).

Everything works on *velocity functions* ``fn(x, sigma) -> v`` (conditioning and CFG baked in), so the same code
serves a pipeline with a LoRA (reference = the LoRA disabled), two separate pipelines, or a trainer's policies;
`pipeline_velocity_fns` builds them for a diffusers pipeline. Trajectories are Euler ODE on an explicit sigma grid
(`flow_trl.sampling.sigma_grid`), sigma going from 1 (noise) to 0 (data).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import Tensor

from .sampling import rollout


VelocityFn = Callable[[Tensor, Tensor], Tensor]
_EPS = 1e-12


def _norms(v: Tensor) -> Tensor:
    """Per-sample L2 norm over the non-batch dims, fp32 `[B]`."""
    return v.float().flatten(1).norm(dim=1)


def renormalized(policy: VelocityFn, reference: VelocityFn) -> VelocityFn:
    """The inference-time renormalisation of eq. 3: ``v' = |v_ref| / |v_theta| * v_theta`` per sample and step.

    Keeps the policy's direction and gives it the reference's norm (the CFG-renorm fix transferred to RL models).
    """

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        v = policy(x, sigma)
        scale = _norms(reference(x, sigma)) / _norms(v).clamp_min(_EPS)
        return v * scale.view(-1, *([1] * (v.dim() - 1))).to(v.dtype)

    return velocity


@torch.no_grad()
def velocity_norm_profile(policy: VelocityFn, reference: VelocityFn, noise: Tensor, sigmas: Tensor) -> dict:
    """Per-step velocity norms along the *policy's* own ODE trajectories (the paper's Figure 3).

    Args:
        policy, reference: velocity functions; both are evaluated at the policy's states.
        noise: initial latents `[B, ...]`. sigmas: grid `[N + 1]` from 1 to 0.

    Returns:
        Lists over the N steps: ``sigma``, ``norm_mean``/``norm_std`` (|v_theta|), ``ref_norm_mean``/``ref_norm_std``
        (|v_ref|) and ``ratio_mean``/``ratio_std`` (per-sample |v_theta| / |v_ref|), plus ``num_samples``.
    """
    keys = ("norm", "ref_norm", "ratio")
    stats: dict = {"sigma": [], **{f"{k}_{s}": [] for k in keys for s in ("mean", "std")}}

    def recording_policy(x: Tensor, sigma: Tensor) -> Tensor:
        v = policy(x, sigma)
        norm, ref_norm = _norms(v), _norms(reference(x, sigma))
        values = {"norm": norm, "ref_norm": ref_norm, "ratio": norm / ref_norm.clamp_min(_EPS)}
        stats["sigma"].append(float(sigma[0]))
        for key, value in values.items():
            stats[f"{key}_mean"].append(value.mean().item())
            stats[f"{key}_std"].append(value.std(unbiased=False).item())
        return v

    rollout(recording_policy, noise, sigmas)
    stats["num_samples"] = len(noise)
    return stats


def norm_scaling_sensitivity(velocity: VelocityFn, noise: Tensor, sigmas: Tensor,
                             reward: Callable[[Tensor], Tensor], checkpoint_steps: bool = False) -> Tensor:
    """The adjoint norm-scaling sensitivity S(t) = v^T a(t) of eq. 5, per sample and step.

    The Euler ODE trajectory is unrolled with autograd and the reward `reward(final_latents) -> [B]` (decode inside
    it) back-propagated once, giving the adjoint ``a_{k+1} = dR/dx_{k+1}`` after every step. Scaling step k's
    velocity by ``1 + eps`` changes the reward at first order by ``dR/deps_k = a_{k+1} . (sigma_{k+1} - sigma_k) v_k``;
    ``S_k = dR/deps_k / |sigma_{k+1} - sigma_k|`` is that change per unit time, the discretisation of eq. 5 in the
    paper's orientation (time from noise to data), so that ``sum_k S_k |dsigma_k|`` is the effect of scaling the
    whole trajectory's velocity. Memory grows with the number of steps; with ``checkpoint_steps=True`` each step's
    forward is recomputed during the backward pass (`torch.utils.checkpoint`), so only the states are kept: use it
    for large models.

    Returns:
        `Tensor`: `[B, N]` (fp64 for fp64 noise, else fp32).
    """
    dtype = noise.dtype if noise.dtype == torch.float64 else torch.float32
    x = noise.detach().to(dtype).requires_grad_(True)
    states, velocities = [], []
    for k in range(len(sigmas) - 1):
        sigma = sigmas[k].expand(len(x))
        if checkpoint_steps:
            v = torch.utils.checkpoint.checkpoint(velocity, x, sigma, use_reentrant=False).to(dtype)
        else:
            v = velocity(x, sigma).to(dtype)
        x = x + (sigmas[k + 1] - sigmas[k]) * v
        x.retain_grad()
        states.append(x)
        velocities.append(v.detach())
    reward(x).sum().backward()
    out = []
    for k, (state, v) in enumerate(zip(states, velocities)):
        dt = sigmas[k + 1] - sigmas[k]
        d_reward = (state.grad * dt * v).flatten(1).sum(dim=1)
        out.append(d_reward / dt.abs())
    return torch.stack(out, dim=1)


def sensitivity_stats(sensitivity: Tensor) -> dict:
    """Per step: batch ``mean``, ``std`` and noise-to-signal ``std / |mean|`` of S (the paper's Figure 4)."""
    mean = sensitivity.mean(dim=0)
    std = sensitivity.std(dim=0, unbiased=False)
    return {"mean": mean.tolist(), "std": std.tolist(), "noise_to_signal": (std / mean.abs().clamp_min(_EPS)).tolist()}


@contextmanager
def _adapters_disabled(transformer):
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def pipeline_velocity_fns(pipe, prompts: list[str], guidance_scale: float = 1.0, reference_pipe=None,
                          max_sequence_length: int | None = None) -> tuple[VelocityFn, VelocityFn]:
    """(policy, reference) velocity functions of a diffusers pipeline on `prompts`.

    The reference is `reference_pipe`'s transformer if given, else the same transformer with its LoRA adapters
    disabled (`pipe.load_lora_weights(...)` or a trainer's adapter), else the transformer itself (ratio 1).
    """
    from .models import get_adapter

    adapter = get_adapter(pipe, max_sequence_length)
    cond = adapter.encode_prompts(prompts)
    negative = adapter.encode_prompts([""]) if guidance_scale != 1.0 else None
    transformer = adapter.transformer

    def policy(x: Tensor, sigma: Tensor) -> Tensor:
        return adapter.velocity(transformer, x, sigma, cond, guidance_scale, negative).float()

    if reference_pipe is not None:
        reference_adapter = get_adapter(reference_pipe, max_sequence_length)

        def reference(x: Tensor, sigma: Tensor) -> Tensor:
            return reference_adapter.velocity(reference_adapter.transformer, x, sigma, cond, guidance_scale,
                                              negative).float()
    elif getattr(transformer, "peft_config", None):
        def reference(x: Tensor, sigma: Tensor) -> Tensor:
            with _adapters_disabled(transformer):
                return adapter.velocity(transformer, x, sigma, cond, guidance_scale, negative).float()
    else:
        reference = policy
    return policy, reference


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("The diagnostics plots need matplotlib: `pip install flow-trl[plots]`.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_norm_profiles(profiles: dict[str, dict], path: str | Path, title: str = "velocity norm per step") -> None:
    """Figure-3-style plot: |v| per step for each named profile, with the reference's norm dashed."""
    plt = _pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, prof) in enumerate(profiles.items()):
        ax1.plot(prof["sigma"], prof["norm_mean"], marker="o", label=name)
        if i == 0:
            ax1.plot(prof["sigma"], prof["ref_norm_mean"], "k--", label="reference")
        ax2.plot(prof["sigma"], prof["ratio_mean"], marker="o", label=name)
    ax1.set(xlabel="sigma (1 = noise)", ylabel="mean |v|", title=title)
    ax2.set(xlabel="sigma (1 = noise)", ylabel="mean |v| / |v_ref|", title="norm ratio")
    ax2.axhline(1.0, color="gray", lw=0.5)
    for ax in (ax1, ax2):
        ax.invert_xaxis()
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(stats: dict, sigmas: list[float], path: str | Path) -> None:
    """Figure-4-style plot: batch mean +- std of S(t) per step, and the noise-to-signal ratio (log scale)."""
    plt = _pyplot()

    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.errorbar(sigmas, mean, yerr=std, marker="o", capsize=3)
    ax1.axhline(0.0, color="gray", lw=0.5)
    ax1.set(xlabel="sigma (1 = noise)", ylabel="S(t)", title="norm-scaling sensitivity (mean +- std)")
    ax2.semilogy(sigmas, stats["noise_to_signal"], marker="o")
    ax2.set(xlabel="sigma (1 = noise)", ylabel="std / |mean|", title="noise-to-signal")
    for ax in (ax1, ax2):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "norm_scaling_sensitivity",
    "pipeline_velocity_fns",
    "plot_norm_profiles",
    "plot_sensitivity",
    "renormalized",
    "sensitivity_stats",
    "velocity_norm_profile",
]
