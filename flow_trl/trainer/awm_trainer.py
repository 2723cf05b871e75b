"""`FlowAWMTrainer`: Advantage Weighted Matching (the pretraining flow-matching loss, weighted by the advantage)."""

from __future__ import annotations

import textwrap
from typing import Any

import torch
from torch import nn

from ..models import index_conditioning
from ..regularizers import velocity_kl
from ..timesteps import flow_matching_mse, flow_target, noise_latents, sample_training_sigmas
from .awm_config import FlowAWMConfig
from .base_trainer import FlowRLTrainer
from .mixins import NormGuardMixin
from .utils import eval_mode


_GHUBER_EPS = 1e-10  # mse^p has an infinite slope at 0 (docs/algorithms.md#awm)


def flow_matching_log_likelihood(
    mse: torch.Tensor, sigma: torch.Tensor, weighting: str = "ghuber", power: float = 0.25
) -> torch.Tensor:
    """AWM's per-sample "log-likelihood" of a clean sample from its flow-matching error `mse` (`[B]`, fp64):
    ``"uniform"``: ``-mse``; ``"ghuber"``: ``-sigma ((mse + 1e-10)^p - 1e-10^p) / p``. Returns `[B]` fp64.
    """
    if weighting == "uniform":
        return -mse
    if weighting == "ghuber":
        return -sigma.double() * ((mse + _GHUBER_EPS) ** power - _GHUBER_EPS**power) / power
    raise ValueError(f"Unknown weighting {weighting!r}; expected 'ghuber' or 'uniform'.")


def awm_loss(
    v_theta: torch.Tensor,
    target: torch.Tensor,
    sigma: torch.Tensor,
    advantages: torch.Tensor,
    weighting: str = "ghuber",
    power: float = 0.25,
    clip_range: float = 1.0,
    old_log_likelihood: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AWM's policy loss (docs/algorithms.md#awm), a pure function.

    ``mse = mean_dims (v_theta - target)^2`` in fp64, ``l = flow_matching_log_likelihood(mse, ...)``;
    ``ratio = exp(l - l_old)`` with the sampling policy's `old_log_likelihood`, or on-policy ``exp(l - sg(l))``,
    exactly 1 but carrying the gradient of `l`; ``loss = mean_b max(-A ratio, -A clip(ratio, 1 - c, 1 + c))``.
    On-policy, its gradient with respect to `v_theta` is ``A t mse^(p - 1) grad(mse)`` (ghuber, up to the 1e-10) or
    ``A grad(mse)`` (uniform), divided by B: positive advantages pull `v_theta` toward the flow target, negative ones
    push it away.

    Args:
        v_theta: trained velocity `[B, ...]` (with gradient). target: flow-matching target ``noise - x0``.
        sigma: `[B]` training sigmas. advantages: `[B]`, typically in [-1, 1].
        weighting, power: see `flow_matching_log_likelihood`. clip_range: PPO clip of the ratio.
        old_log_likelihood: `[B]` fp64 log-likelihood of the same inputs under the policy that sampled, once the
            trained policy has moved since the rollout; `None` on-policy.
    """
    mse = flow_matching_mse(v_theta, target, torch.float64)
    log_likelihood = flow_matching_log_likelihood(mse, sigma, weighting, power)
    old = log_likelihood.detach() if old_log_likelihood is None else old_log_likelihood.double()
    ratio = torch.exp(log_likelihood - old)
    a = advantages.double()
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean().float()
    metrics = {
        "awm/mse": mse.detach().mean(),
        "awm/log_likelihood": log_likelihood.detach().mean(),
        "awm/ratio": ratio.detach().mean(),
        "awm/clip_frac": ((ratio.detach() - 1).abs() > clip_range).double().mean(),
    }
    return loss, metrics


class FlowAWMTrainer(NormGuardMixin, FlowRLTrainer):
    """Trainer for Advantage Weighted Matching ([AWM: Aligning RL with Pretraining in Diffusion
    Models](https://huggingface.co/papers/2509.25050)).

    Rollouts sample clean images with the current policy (CFG-free by default); training re-noises them at sigmas
    from a timestep sampler and applies the pretraining flow-matching loss, weighted by each sample's advantage
    (with a generalised-Huber weighting), plus a velocity KL to the base model and to a lagged EMA adapter.

    Example:

    ```python
    from peft import LoraConfig
    from flow_trl import FlowAWMConfig, FlowAWMTrainer
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset

    trainer = FlowAWMTrainer(
        model=str(SHAPES_PIPELINE_DIR),
        args=FlowAWMConfig(output_dir="shapes-awm", max_steps=100),
        reward_funcs="shapes",
        train_dataset=shapes_dataset("train"),
        peft_config=LoraConfig(r=16, lora_alpha=32),
    )
    trainer.train()
    ```

    Args: see [`FlowRLTrainer`]; `args` is a [`FlowAWMConfig`].
    """

    config_class = FlowAWMConfig
    _tag_names = ["flow-trl", "diffusers", "text-to-image", "awm"]
    _name = "AWM"
    # docstyle-ignore
    _paper = {
        "title": "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models",
        "id": "2509.25050",
        "citation": textwrap.dedent("""\
            @article{xue2025awm,
                title   = {{Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models}},
                author  = {Shuchen Xue and Chongjian Ge and Shilong Zhang and Yichen Li and Zhi-Ming Ma},
                journal = {arXiv preprint arXiv:2509.25050},
                year    = {2025},
            }"""),
    }
    _policy_adapters = ("ema",)

    def _before_generation(self) -> None:
        self._soft_update("ema", self.args.ema_decay_schedule, self.args.ema_max_decay, "awm/ema_decay")

    def _prepare_training_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Advantages times `advantage_max / advantage_scale`; training sigmas and their noise; the optimizer
        step of the rollout and, when the rollout is trained over more than one optimizer step, the sampling
        policy's log-likelihood of every training input (`old_log_likelihood`, `[B, k]`)."""
        args = self.args
        latents = inputs["latents"]
        sigmas = sample_training_sigmas(args.timestep_sampler, len(latents), args.num_train_timesteps, self.sigmas,
                                        generator, shift=self.sigma_shift)
        advantages = inputs["advantages"] / args.advantage_scale * args.advantage_max
        inputs = {**inputs, "advantages": advantages, **self._forward_process_noise(latents, sigmas, generator),
                  "rollout_step": self.state.global_step}
        # a rollout's micro-batches share one optimizer step only if each step trains whole rollouts
        if args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations):
            inputs["old_log_likelihood"] = self._sampling_log_likelihood(inputs)
        return inputs

    def _flow_matching_inputs(self, inputs: dict[str, Any], chunk: int, rows=slice(None)):
        """(x0, noise, sigma, x_t) of training sigma `chunk` for the rows `rows` of a rollout or micro-batch."""
        x0, noise = inputs["latents"][rows].float(), inputs["train_noise"][rows, chunk]
        sigma = inputs["train_sigmas"][rows, chunk]
        return x0, noise, sigma, noise_latents(x0, sigma, noise)

    @torch.no_grad()
    def _sampling_log_likelihood(self, inputs: dict[str, Any]) -> torch.Tensor:
        """`flow_matching_log_likelihood` `[B, k]` of the rollout's training inputs under the policy as it sampled
        (computed at rollout time, a micro-batch at a time, like the reference's pass before an epoch's training)."""
        args, batch = self.args, self.args.per_device_train_batch_size
        columns = []
        with eval_mode(self.model):
            for chunk in range(inputs["train_sigmas"].shape[1]):
                parts = []
                for start in range(0, len(inputs["latents"]), batch):
                    rows = slice(start, start + batch)
                    x0, noise, sigma, x_t = self._flow_matching_inputs(inputs, chunk, rows)
                    v = self.velocity(self.model, x_t, sigma, index_conditioning(inputs["cond"], rows))
                    mse = flow_matching_mse(v, flow_target(x0, noise), torch.float64)
                    parts.append(flow_matching_log_likelihood(mse, sigma, args.weighting, args.ghuber_power))
                columns.append(torch.cat(parts))
        return torch.stack(columns, dim=1)

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], chunk: int) -> torch.Tensor:
        args, cond = self.args, inputs["cond"]
        x0, noise, sigma, x_t = self._flow_matching_inputs(inputs, chunk)
        v_theta = self.velocity(model, x_t, sigma, cond)
        # on-policy until the first optimizer step after the rollout, then a ratio to the sampling policy
        old = None if self.state.global_step == inputs["rollout_step"] else inputs["old_log_likelihood"][:, chunk]
        loss, metrics = awm_loss(v_theta, flow_target(x0, noise), sigma, inputs["advantages"], args.weighting,
                                 args.ghuber_power, args.clip_range, old)
        if args.ema_kl_coef > 0:
            with torch.no_grad(), self.policy("ema") as ema:
                v_ema = self.velocity(ema, x_t, sigma, cond)
            ema_loss, ema_metrics = velocity_kl(v_theta, v_ema, args.ema_kl_coef)
            loss = loss + ema_loss
            metrics["awm/ema_kl"] = ema_metrics["kl"]
        loss = loss + self.reference_terms(x_t, sigma, cond, v_theta)
        self._log_train_metrics(metrics)
        return loss


__all__ = ["FlowAWMTrainer", "awm_loss", "flow_matching_log_likelihood"]
