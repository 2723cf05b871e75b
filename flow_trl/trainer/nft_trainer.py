"""`FlowNFTTrainer`: Diffusion-NFT (negative-aware fine-tuning on the forward process)."""

from __future__ import annotations

import textwrap
from typing import Any

import torch
from torch import nn

from ..timesteps import noise_latents, sample_training_sigmas
from .base_trainer import FlowRLTrainer
from .mixins import NormGuardMixin
from .nft_config import FlowNFTConfig


OLD_POLICY_MAX_DECAY = 0.5  # cap of the "linear" schedule (the reference's decay_type 1)


def advantage_to_r(advantages: torch.Tensor, advantage_scale: float) -> torch.Tensor:
    """NFT's optimality probability ``r = clip(A / scale / 2 + 0.5, 0, 1)``: A = 0 -> 0.5, A >= scale -> 1."""
    return (advantages / advantage_scale / 2 + 0.5).clamp(0, 1)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    r: torch.Tensor,
    strength: float,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-NFT's policy loss (docs/algorithms.md#nft), a pure function.

    ``v+ = b v_theta + (1 - b) v_old`` and ``v- = (1 + b) v_old - b v_theta`` define x0-predictions
    ``x0± = x_t - sigma v±``; each squared error is divided by its detached mean absolute error (adaptive weighting,
    clipped below at 1e-5), and ``loss = loss_scale * mean_b((r L+ + (1 - r) L-) / b)``. All math in fp32.

    Args:
        v_theta: trained velocity `[B, ...]` (with gradient). v_old: old-policy velocity (no gradient).
        x_t: the noised clean latents at `sigma`. x0: the clean latents. sigma: `[B]` in [0, 1].
        r: `[B]` optimality probabilities in [0, 1]. strength: `b` above (`implicit_policy_strength`).
            loss_scale: the reference multiplies by its advantage scale (5, `advantage_scale`).
    """
    dims = tuple(range(1, v_theta.dim()))
    s = sigma.float().view(-1, *([1] * (v_theta.dim() - 1)))
    v_theta, v_old, x_t, x0 = v_theta.float(), v_old.float().detach(), x_t.float(), x0.float()
    x0_pos = x_t - s * (strength * v_theta + (1 - strength) * v_old)
    x0_neg = x_t - s * ((1 + strength) * v_old - strength * v_theta)
    w_pos = (x0_pos - x0).abs().mean(dims).detach().clamp(min=1e-5)
    w_neg = (x0_neg - x0).abs().mean(dims).detach().clamp(min=1e-5)
    loss_pos = (x0_pos - x0).pow(2).mean(dims) / w_pos
    loss_neg = (x0_neg - x0).pow(2).mean(dims) / w_neg
    loss = loss_scale * ((r * loss_pos + (1 - r) * loss_neg) / strength).mean()
    metrics = {"nft/positive_loss": loss_pos.detach().mean(), "nft/negative_loss": loss_neg.detach().mean()}
    return loss, metrics


class FlowNFTTrainer(NormGuardMixin, FlowRLTrainer):
    """Trainer for Diffusion-NFT ([DiffusionNFT: Online Diffusion Reinforcement with Forward
    Process](https://huggingface.co/papers/2509.16117)).

    Rollouts sample clean images with the "old" policy (any sampler, ODE by default); training noises them again
    at grid sigmas and regresses the implicit positive policy toward high-reward images and the implicit negative
    policy toward low-reward ones. No likelihoods, no trajectories: only final latents are kept.

    Example:

    ```python
    from peft import LoraConfig
    from flow_trl import FlowNFTConfig, FlowNFTTrainer
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset

    trainer = FlowNFTTrainer(
        model=str(SHAPES_PIPELINE_DIR),
        args=FlowNFTConfig(output_dir="shapes-nft", max_steps=100),
        reward_funcs="shapes",
        train_dataset=shapes_dataset("train"),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["attn.to_q", "attn.to_k", "attn.to_v"]),
    )
    trainer.train()
    ```

    Args: see [`FlowRLTrainer`]; `args` is a [`FlowNFTConfig`].
    """

    config_class = FlowNFTConfig
    _tag_names = ["flow-trl", "diffusers", "text-to-image", "nft"]
    _name = "NFT"
    # docstyle-ignore
    _paper = {
        "title": "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
        "id": "2509.16117",
        "citation": textwrap.dedent("""\
            @inproceedings{zheng2026diffusionnft,
                title     = {{DiffusionNFT: Online Diffusion Reinforcement with Forward Process}},
                author    = {Kaiwen Zheng and Huayu Chen and Haotian Ye and Haoxiang Wang and Qinsheng Zhang and
                             Kai Jiang and Hang Su and Stefano Ermon and Jun Zhu and Ming-Yu Liu},
                booktitle = {International Conference on Learning Representations},
                year      = {2026},
            }"""),
    }
    _policy_adapters = ("old",)
    _sampling_policy = "old"

    @property
    def rollout_guidance_scale(self) -> float:
        scale = self.args.rollout_guidance_scale
        return self.args.guidance_scale if scale is None else scale

    def _before_generation(self) -> None:
        self._soft_update("old", self.args.old_policy_decay, OLD_POLICY_MAX_DECAY, "nft/old_policy_decay")

    def _prepare_training_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Per sample: `int(T * timestep_fraction)` distinct grid sigmas in random order, and their fresh noise."""
        k = max(1, int(self.args.num_inference_steps * self.args.timestep_fraction))
        sigmas = sample_training_sigmas("grid_subset", len(inputs["latents"]), k, self.sigmas, generator)
        return {**inputs, **self._forward_process_noise(inputs["latents"], sigmas, generator)}

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], chunk: int) -> torch.Tensor:
        cond = inputs["cond"]
        x0 = inputs["latents"].float()
        sigma = inputs["train_sigmas"][:, chunk]
        x_t = noise_latents(x0, sigma, inputs["train_noise"][:, chunk])
        v_theta = self.velocity(model, x_t, sigma, cond)
        with torch.no_grad(), self.policy("old") as old:
            v_old = self.velocity(old, x_t, sigma, cond)
        args = self.args
        r = advantage_to_r(inputs["advantages"], args.advantage_scale)
        loss, metrics = nft_loss(v_theta, v_old, x_t, x0, sigma, r, args.implicit_policy_strength,
                                 loss_scale=args.advantage_scale)
        loss = loss + self.reference_terms(x_t, sigma, cond, v_theta)
        self._log_train_metrics(metrics)
        return loss


__all__ = ["FlowNFTTrainer", "advantage_to_r", "nft_loss"]
