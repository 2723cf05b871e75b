"""Group-relative advantages (Flow-GRPO's `PerPromptStatTracker`, TRL's `scale_rewards`) and their statistics.

Groups are contiguous blocks of `num_generations` rewards (the prompt sampler keeps each prompt's generations
together); pass the rewards gathered over all processes so that no group is split. Standard deviations are
population stds (``unbiased=False``) plus 1e-4 by default, as flow_grpo computes them (numpy); `ADVANTAGE_STDS`
also names DanceGRPO's convention (torch's unbiased std plus 1e-8; TRL's GRPO uses the unbiased std too, with 1e-4).
NaN rewards (a reward function that abstains; also +-inf) are left out of every mean and std.
"""

from __future__ import annotations

import torch
from torch import Tensor


SCALES = ("group", "batch", "none")
# std conventions of the group advantage, as `group_advantages` keyword arguments: "population" (1/N, + 1e-4:
# flow_grpo's numpy, every flow_trl trainer) and "unbiased" (1/(N - 1), + 1e-8: DanceGRPO's code)
ADVANTAGE_STDS: dict[str, dict[str, bool | float]] = {
    "population": {"unbiased": False, "eps": 1e-4},
    "unbiased": {"unbiased": True, "eps": 1e-8},
}


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    """`[N]` rewards -> fp32 `[N / G, G]`, with clear errors on bad geometry."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D tensor [N]; got shape {tuple(rewards.shape)}.")
    if num_generations < 1:
        raise ValueError(f"num_generations must be at least 1; got {num_generations}.")
    if len(rewards) % num_generations:
        raise ValueError(
            f"The number of rewards N={len(rewards)} is not divisible by num_generations G={num_generations}; "
            "groups are contiguous blocks of G rewards, so pass whole groups (N a multiple of G)."
        )
    return rewards.float().view(-1, num_generations)


def _nan_mean_std(values: Tensor, dim: int | None = None, unbiased: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, std and count of the finite values over `dim` (all elements when None); NaN if none (and, unbiased, if
    only one). The std is the population one, or with `unbiased` Bessel's ``1 / (count - 1)``."""
    finite = torch.isfinite(values)
    zeroed = torch.where(finite, values, torch.zeros_like(values))
    dims = dim if dim is not None else tuple(range(values.ndim))
    count = finite.sum(dim=dims, keepdim=True)
    mean = zeroed.sum(dim=dims, keepdim=True) / count
    var = (torch.where(finite, values - mean, torch.zeros_like(values)) ** 2).sum(dim=dims, keepdim=True)
    return mean, (var / (count - int(unbiased))).sqrt(), count


def group_advantages(rewards: Tensor, num_generations: int, scale: str = "group", eps: float = 1e-4,
                     unbiased: bool = False) -> Tensor:
    """Group-relative advantages ``(r - group mean) / (std + eps)``.

    Args:
        rewards (`Tensor`): `[N]` rewards; N must be a multiple of `num_generations`, groups are contiguous blocks.
        num_generations (`int`): group size G.
        scale (`str`, defaults to `"group"`): the std: the group's own (`"group"`), the std of all N rewards
            (`"batch"`, flow_grpo's `global_std=True`), or no division (`"none"`).
        eps (`float`, defaults to `1e-4`): added to the std (flow_grpo's value; DanceGRPO uses 1e-8).
        unbiased (`bool`, defaults to `False`): Bessel-corrected std (``1 / (N - 1)``, torch's default, DanceGRPO)
            instead of the population std (``1 / N``, flow_grpo's numpy). See `ADVANTAGE_STDS`.

    Returns:
        `Tensor`: `[N]` fp32 advantages. Samples with a NaN reward, and every sample of a group with fewer than
        two finite rewards, get 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}.")
    grouped = _grouped(rewards, num_generations)
    mean, group_std, count = _nan_mean_std(grouped, dim=1, unbiased=unbiased)
    centred = grouped - mean
    if scale == "group":
        advantages = centred / (group_std + eps)
    elif scale == "batch":
        advantages = centred / (_nan_mean_std(grouped, unbiased=unbiased)[1] + eps)
    else:
        advantages = centred
    valid = torch.isfinite(grouped) & (count >= 2)
    return torch.where(valid, advantages, torch.zeros_like(advantages)).view(-1)


STEP_ADVANTAGE_MODES = ("score", "gain")


def step_advantages(scores_after: Tensor, num_generations: int, mode: str = "score",
                    scores_before: Tensor | None = None, scale: str = "group", eps: float = 1e-4,
                    unbiased: bool = False) -> Tensor:
    """Per-step group-relative advantages from a step scorer (Step-GRPO, docs/algorithms.md#step-advantages).

    Every step ``j`` is normalised on its own, within each group (`group_advantages` per column):

    - ``"score"`` (option A): the score of the state reached, ``R_j = DRM(x_{j+1})``;
    - ``"gain"`` (option B): the score gained by the step, ``g_j = DRM(x_{j+1}) - DRM(x_j)``.

    Args:
        scores_after (`Tensor`): `[N, S]` scores of the states after each of the S recorded steps.
        num_generations (`int`): group size G (groups are contiguous blocks of rows).
        mode (`str`, defaults to `"score"`): one of `STEP_ADVANTAGE_MODES`.
        scores_before (`Tensor`, *optional*): `[N, S]` scores of the states before each step (needed by `"gain"`).
        scale (`str`, defaults to `"group"`), eps (`float`, defaults to `1e-4`), unbiased (`bool`, defaults to
            `False`): as in `group_advantages`.

    Returns:
        `Tensor`: `[N, S]` fp32 advantages.
    """
    if mode not in STEP_ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {STEP_ADVANTAGE_MODES}; got {mode!r}.")
    if scores_after.ndim != 2:
        raise ValueError(f"scores_after must be [N, S] (samples x steps); got shape {tuple(scores_after.shape)}.")
    if mode == "gain":
        if scores_before is None or scores_before.shape != scores_after.shape:
            raise ValueError("mode='gain' needs scores_before with the shape of scores_after.")
        scores_after = scores_after - scores_before
    columns = [group_advantages(scores_after[:, j], num_generations, scale, eps, unbiased)
               for j in range(scores_after.shape[1])]
    return torch.stack(columns, dim=1)


def mix_advantages(step_adv: Tensor, terminal_adv: Tensor, terminal_weight: float) -> Tensor:
    """``(1 - w) A_step + w A_terminal`` with the terminal advantage `[N]` broadcast over the steps of `[N, S]`
    (w = 0: per-step only; w = 1: GRPO's terminal advantage on every step)."""
    if not 0 <= terminal_weight <= 1:
        raise ValueError(f"terminal_weight must be in [0, 1]; got {terminal_weight}.")
    return (1 - terminal_weight) * step_adv + terminal_weight * terminal_adv.float()[:, None]


SHAPINGS = ("none", "slas")
SLAS_ORDERS = ("normalize_then_shape", "shape_then_normalize")


def shape_advantages(adv: Tensor, gamma: float) -> Tensor:
    """Super-linear advantage shaping (SLAS, eq. 20 of its paper; docs/algorithms.md#slas):
    ``sign(A) |A|^(1 + gamma)``.

    ``gamma = 0`` is the identity; ``gamma > 0`` amplifies large advantages and shrinks those below 1 in magnitude
    (e.g. gamma = 1: [-2, -0.5, 0.5, 2] -> [-4, -0.25, 0.25, 4]).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (0 is no shaping); got {gamma}.")
    return torch.sign(adv) * adv.abs().pow(1 + gamma)


def slas_advantages(rewards: Tensor, num_generations: int, gamma: float, order: str = "normalize_then_shape",
                    eps: float = 1e-4) -> Tensor:
    """SLAS advantages: ``delta r = r - group mean``, batch-level std normalisation, super-linear shaping.

    - ``"normalize_then_shape"`` (default): ``shape(delta r / (std of the batch's rewards + eps))``, so gamma acts
      in units of the batch std (a reward-scale-free setting);
    - ``"shape_then_normalize"``: ``shape(delta r)`` divided by the population std of the shaped values (+ eps).

    NaN rewards give 0, as in `group_advantages`.
    """
    if order not in SLAS_ORDERS:
        raise ValueError(f"order must be one of {SLAS_ORDERS}; got {order!r}.")
    if order == "normalize_then_shape":
        return shape_advantages(group_advantages(rewards, num_generations, "batch", eps), gamma)
    shaped = shape_advantages(group_advantages(rewards, num_generations, "none"), gamma)
    return shaped / (shaped.std(unbiased=False) + eps)


def adapt_slas_gamma(gamma: float, approx_kl: float, target_kl: float, factor: float = 1.1,
                     max_gamma: float = 4.0) -> float:
    """One step of a KL-targeted SLAS exponent (gamma bounded by a trust region: the SLAS paper's appendix E,
    docs/algorithms.md#slas).

    If the policy moved less than ``target_kl / 1.5`` since the last rollout, amplify (``gamma * factor``, or 0.05 from
    0); if more than ``1.5 target_kl``, shrink (``gamma / factor``); otherwise keep it. Clamped to
    ``[0, max_gamma]``.
    """
    if target_kl <= 0 or factor <= 1:
        raise ValueError(f"target_kl must be positive and factor above 1; got {target_kl} and {factor}.")
    if approx_kl < target_kl / 1.5:
        gamma = max(gamma * factor, 0.05)
    elif approx_kl > target_kl * 1.5:
        gamma = gamma / factor
    return min(max(gamma, 0.0), max_gamma)


def clip_advantages(adv: Tensor, max_abs: float | None) -> Tensor:
    """Clamp advantages to ``[-max_abs, max_abs]`` (flow_grpo's `adv_clip_max`, 5); `None` returns them unchanged."""
    if max_abs is None:
        return adv
    if max_abs <= 0:
        raise ValueError(f"max_abs must be positive or None (no clipping); got {max_abs}.")
    return adv.clamp(-max_abs, max_abs)


def best_worst_pairs(
    rewards: Tensor, num_generations: int, pairs_per_group: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Online Diffusion-DPO's pairs, matched by rank within each group: the highest-reward sample (winner) against
    the lowest (loser), then, with `pairs_per_group` k > 1, the second highest against the second lowest, and so on
    to the k-th.

    Non-finite (NaN, infinite) rewards are ignored; ties go to the earliest sample. A pair whose winner's reward does
    not exceed its loser's (equal rewards, or too few finite rewards in the group) is invalid: it carries no
    preference, and only such a pair can share an image with another.

    Args:
        rewards (`Tensor`): `[N]` rewards in contiguous groups of `num_generations`.
        num_generations (`int`): group size G.
        pairs_per_group (`int`, defaults to `1`): k, at most G // 2, so that no image is in two valid pairs.

    Returns:
        `tuple[Tensor, Tensor, Tensor]`: winner indices `[N / G * k]`, loser indices `[N / G * k]` (into the N
        samples; group by group, best pair first) and a bool `valid` mask `[N / G * k]`.
    """
    grouped = _grouped(rewards, num_generations)
    if not 1 <= pairs_per_group <= num_generations // 2:
        raise ValueError(
            f"pairs_per_group must be between 1 and num_generations // 2 = {num_generations // 2} (each image in at "
            f"most one pair); got {pairs_per_group}."
        )
    finite = torch.isfinite(grouped)
    down = torch.where(finite, grouped, torch.full_like(grouped, -torch.inf))
    up = torch.where(finite, grouped, torch.full_like(grouped, torch.inf))
    best = down.sort(dim=1, descending=True, stable=True)
    worst = up.sort(dim=1, stable=True)
    offset = (torch.arange(len(grouped)) * num_generations)[:, None]
    winners, losers = best.indices[:, :pairs_per_group] + offset, worst.indices[:, :pairs_per_group] + offset
    win, lose = best.values[:, :pairs_per_group], worst.values[:, :pairs_per_group]
    valid = torch.isfinite(win) & torch.isfinite(lose) & (win > lose)
    return winners.flatten(), losers.flatten(), valid.flatten()


def reward_stats(rewards: Tensor, num_generations: int) -> dict[str, float]:
    """Reward metrics of one rollout: `"reward"` (NaN-ignoring mean), `"reward_std"` (population std over all
    finite rewards) and `"frac_reward_zero_std"` (fraction of groups whose std is below 1e-8, i.e. groups that give
    no learning signal; a group with fewer than two finite rewards counts as zero-std)."""
    grouped = _grouped(rewards, num_generations)
    mean, std, _ = _nan_mean_std(grouped)
    _, group_std, count = _nan_mean_std(grouped, dim=1)
    return {
        "reward": mean.item(),
        "reward_std": std.item(),
        "frac_reward_zero_std": ((group_std < 1e-8) | (count < 2)).float().mean().item(),
    }


def advantage_stats(adv: Tensor) -> dict[str, float]:
    """Advantage metrics: mean, population std, mean absolute value, max and min (keys `"advantages/..."`)."""
    adv = adv.float()
    return {
        "advantages/mean": adv.mean().item(),
        "advantages/std": adv.std(unbiased=False).item(),
        "advantages/abs_mean": adv.abs().mean().item(),
        "advantages/max": adv.max().item(),
        "advantages/min": adv.min().item(),
    }
