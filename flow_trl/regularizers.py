"""Velocity-space regularizers against a reference velocity at the same ``(x_t, sigma, cond)``.

Each regularizer is a pure function returning ``(loss, metrics)``: a scalar fp32 loss to add to the algorithm's
loss and a dict of floats to log. The reference velocity `v_ref` is always detached: gradient reaches only `v`.
"""

from __future__ import annotations

import torch
from torch import Tensor


_EPS = 1e-12  # lower bound on |v_ref|^2, only to keep an all-zero reference velocity from dividing by zero


def _squared_norms(v: Tensor) -> Tensor:
    """Per-sample squared L2 norm over the non-batch dims, fp32 `[B]`."""
    return v.float().pow(2).flatten(1).sum(dim=1)


def _check_shapes(v: Tensor, v_ref: Tensor) -> None:
    if v.shape != v_ref.shape:
        raise ValueError(f"v and v_ref must have the same shape; got {tuple(v.shape)} and {tuple(v_ref.shape)}.")


def velocity_norm_ratio(v: Tensor, v_ref: Tensor) -> Tensor:
    """Per-sample ``|v| / |v_ref|`` over the non-batch dims: the norm-inflation diagnostic of NormGuard.

    Args:
        v (`Tensor`): policy velocity `[B, ...]`.
        v_ref (`Tensor`): reference velocity at the same inputs (detached here).

    Returns:
        `Tensor`: `[B]` fp32 ratios (above 1 means the policy's velocity is inflated).
    """
    _check_shapes(v, v_ref)
    return (_squared_norms(v) / _squared_norms(v_ref.detach()).clamp_min(_EPS)).sqrt()


def norm_guard(v: Tensor, v_ref: Tensor, coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """NormGuard: a one-sided hinge on the policy's velocity norm above the reference's (docs/algorithms.md#normguard).

    ``R = coef * mean_b max(0, (|v_b|^2 - |v_ref,b|^2) / |v_ref,b|^2)`` with ``|.|^2`` the squared L2 norm of one
    sample's whole velocity (all non-batch dims). This is the paper's eq. 7 for one sampled ``(x_t, t, c)`` and its
    batch average (eq. 8) — per sample, not per token or per pixel,. While active, its gradient
    w.r.t. ``v_b`` is ``2 coef v_b / (B |v_ref,b|^2)``: parallel to ``v_b``, so it only shrinks the norm and leaves
    the direction alone; inactive samples get no gradient. `v_ref` is detached (the paper's reference is frozen);
    ``|v_ref|^2`` is bounded below by 1e-12 only to guard an all-zero reference against division by zero. The paper
    does not say whether ``v`` is the guided (CFG) or conditional velocity; callers pass the same velocity the
    algorithm's loss uses.

    Args:
        v (`Tensor`): policy velocity `[B, ...]` (with grad).
        v_ref (`Tensor`): reference velocity at the same inputs.
        coef (`float`): lambda, the regularization strength (the paper uses 1.0 for NFT/DPO, 0.01 for AWM).

    Returns:
        `tuple[Tensor, dict[str, Tensor]]`: the scalar loss and `"norm_guard/loss"`, `"norm_guard/active_frac"`
        (fraction of samples with ``|v| > |v_ref|``) and `"velocity_norm_ratio"` (mean of ``|v| / |v_ref|``), as
        detached 0-d tensors (read when logged, not per call).
    """
    _check_shapes(v, v_ref)
    if coef < 0:
        raise ValueError(f"coef must be non-negative (0 disables NormGuard); got {coef}.")
    norm = _squared_norms(v)
    norm_ref = _squared_norms(v_ref.detach()).clamp_min(_EPS)
    loss = coef * torch.relu((norm - norm_ref) / norm_ref).mean()  # relu: zero gradient also at the boundary
    norm_value = norm.detach()
    metrics = {
        "norm_guard/loss": loss.detach(),
        "norm_guard/active_frac": (norm_value > norm_ref).float().mean(),
        "velocity_norm_ratio": (norm_value / norm_ref).sqrt().mean(),
    }
    return loss, metrics


def velocity_kl(v: Tensor, v_ref: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Velocity-space KL to the reference: ``beta * mean_b mean_dims (v - v_ref)^2``.

    The KL between two Gaussian step policies with the same std is proportional to the squared difference of their
    means, hence of their velocities (NFT's and AWM's KL term).

    Args:
        v (`Tensor`): policy velocity `[B, ...]` (with grad).
        v_ref (`Tensor`): reference velocity at the same inputs (detached here).
        beta (`float`): KL coefficient.

    Returns:
        `tuple[Tensor, dict[str, Tensor]]`: the scalar loss and `"kl"` (the unscaled mean squared difference, a
        detached 0-d tensor).
    """
    _check_shapes(v, v_ref)
    kl = (v.float() - v_ref.detach().float()).pow(2).flatten(1).mean(dim=1).mean()
    return beta * kl, {"kl": kl.detach()}
