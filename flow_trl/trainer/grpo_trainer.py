"""`DanceGRPOTrainer`: GRPO on SDE rollouts, with PPO clipping of per-step log-prob ratios."""

from __future__ import annotations

import textwrap
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ..advantages import ADVANTAGE_STDS, adapt_slas_gamma, clip_advantages, group_advantages, slas_advantages
from ..sampling import StepOutput, step
from .base_trainer import FlowRLTrainer, to_floats
from .grpo_config import DanceGRPOConfig
from .transitions import Transition, transition_kl


def grpo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate on one transition per sample, a pure function.

    ``ratio = exp(logp - logp_old)``, ``loss = mean_b max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))``. Metrics:
    ``ratio`` (mean), ``clip_frac`` (fraction with ``|ratio - 1| > eps``) and ``approx_kl``
    (``mean (logp - logp_old)^2 / 2``, flow_grpo's estimator), as detached 0-d tensors (read when logged).
    """
    log_ratio = log_prob.float() - old_log_prob.float().detach()
    ratio = torch.exp(log_ratio)
    a = advantages.float()
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    metrics = {
        "ratio": ratio.detach().mean(),
        "clip_frac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * log_ratio.detach().pow(2).mean(),
    }
    return loss, metrics


class DanceGRPOTrainer(FlowRLTrainer):
    """Trainer for GRPO on flow-matching SDE rollouts: DanceGRPO ([DanceGRPO: Unleashing GRPO on Visual
    Generation](https://huggingface.co/papers/2505.07818)), Flow-GRPO with `sde_type="flow_sde"`, or CPS steps; with
    SLAS advantage shaping through `advantage_shaping="slas"`.

    Rollouts sample with a stochastic step (all transitions but the last), record each transition and its log-prob;
    training recomputes the log-prob of a random subset of them under the current policy and applies PPO's clipped
    surrogate with the group advantages.

    Example:

    ```python
    from peft import LoraConfig
    from flow_trl import DanceGRPOConfig, DanceGRPOTrainer
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset

    trainer = DanceGRPOTrainer(
        model=str(SHAPES_PIPELINE_DIR),
        args=DanceGRPOConfig(output_dir="shapes-grpo", advantage_shaping="slas", slas_gamma=1.0),
        reward_funcs="shapes",
        train_dataset=shapes_dataset("train"),
        peft_config=LoraConfig(r=16, lora_alpha=32),
    )
    trainer.train()
    ```

    Args: see [`FlowRLTrainer`]; `args` is a [`DanceGRPOConfig`].
    """

    config_class = DanceGRPOConfig
    # approx_kl of every loss chunk since the last rollout (for slas_target_kl; tensors until read once a rollout)
    _approx_kls: tuple[float | torch.Tensor, ...] = ()
    _adapted_slas_gamma: float | None = None  # set once slas_target_kl has adapted it
    _tag_names = ["flow-trl", "diffusers", "text-to-image", "grpo"]
    _name = "GRPO"
    # docstyle-ignore
    _paper = {
        "title": "DanceGRPO: Unleashing GRPO on Visual Generation",
        "id": "2505.07818",
        "citation": textwrap.dedent("""\
            @article{xue2025dancegrpo,
                title   = {{DanceGRPO: Unleashing GRPO on Visual Generation}},
                author  = {Zeyue Xue and Jie Wu and Yu Gao and Fangyuan Kong and Lingting Zhu and Mengzhao Chen and
                           Zhiheng Liu and Wei Liu and Qiushan Guo and Weilin Huang and Ping Luo},
                journal = {arXiv preprint arXiv:2505.07818},
                year    = {2025},
            }"""),
    }

    @property
    def slas_gamma(self) -> float:
        """The SLAS exponent of the next rollout: `args.slas_gamma`, adapted during training with `slas_target_kl`
        (the config keeps the value the user gave)."""
        return self.args.slas_gamma if self._adapted_slas_gamma is None else self._adapted_slas_gamma

    def _before_generation(self) -> None:
        """With `slas_target_kl`, adapt `slas_gamma` to the previous rollout's mean approx_kl."""
        args, kls = self.args, self._approx_kls
        self._approx_kls = ()
        if args.slas_target_kl is None:
            return
        if kls:
            mean_kl = sum(to_floats(list(kls))) / len(kls)
            self._adapted_slas_gamma = adapt_slas_gamma(self.slas_gamma, mean_kl, args.slas_target_kl)
        self._metrics["train"]["slas/gamma"].append(self.slas_gamma)

    def _algorithm_state(self) -> dict[str, Any]:
        """The adapted `slas_gamma` and the approx_kls it has not consumed yet (with `slas_target_kl`)."""
        if self.args.slas_target_kl is None:
            return {}
        return {"slas_gamma": self.slas_gamma, "approx_kls": to_floats(list(self._approx_kls))}

    def _restore_algorithm_state(self, state: dict[str, Any]) -> None:
        if "slas_gamma" in state:
            self._adapted_slas_gamma = state["slas_gamma"]
            self._approx_kls = tuple(state["approx_kls"])

    def compute_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """As [`FlowRLTrainer`], with the std convention `advantage_std` (SLAS keeps its batch population std) and
        the current (possibly adapted) `slas_gamma`."""
        args = self.args
        if args.advantage_shaping == "slas":
            advantages = slas_advantages(rewards, args.num_generations, self.slas_gamma, args.slas_order)
        else:
            advantages = group_advantages(rewards, args.num_generations, args.scale_rewards,
                                          **ADVANTAGE_STDS[args.advantage_std])
        return clip_advantages(advantages, args.advantage_clip)

    def _rollout_sde_steps(self, generator: torch.Generator) -> list[int] | None:
        """With `sde_window_size`, a window of that many consecutive steps whose start is drawn uniformly within
        `sde_window_range` (Flow-GRPO-Fast); else every step but the last."""
        size = self.args.sde_window_size
        if size is None:
            return None
        first, end = self.args.sde_window_bounds
        start = first + int(torch.randint(end - first - size + 1, (1,), generator=generator))
        return list(range(start, start + size))

    def _initial_noise(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """With `same_initial_noise`, one noise per group (groups are contiguous and whole on each process)."""
        if not self.args.same_initial_noise:
            return super()._initial_noise(num_samples, generator)
        groups = super()._initial_noise(num_samples // self.args.num_generations, generator)
        return groups.repeat_interleave(self.args.num_generations, dim=0)

    def _prepare_training_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Per sample: a random `int(num_inference_steps * timestep_fraction)` (at least 1, at most S) of its S
        recorded (stochastic) transitions, the fraction counted over the sampling steps as Flow-GRPO does (0.99 of 10
        steps trains 9: every transition but the final one, which is never recorded)."""
        n, recorded = inputs["log_probs"].shape
        k = min(recorded, max(1, int(self.args.num_inference_steps * self.args.timestep_fraction)))
        train_steps = torch.stack([torch.randperm(recorded, generator=generator)[:k] for _ in range(n)])
        return {**inputs, "train_steps": train_steps.to(inputs["log_probs"].device)}

    def _num_loss_chunks(self, inputs: dict[str, Any]) -> int:
        return inputs["train_steps"].shape[1]

    @staticmethod
    def _transition_advantages(inputs: dict[str, Any], rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Advantages `[B]` of the trained transitions `steps` (indices into the recorded ones, one per row): the
        sample's advantage when `inputs["advantages"]` is `[B]` (GRPO), the step's when it is `[B, S]` (per-step
        advantages, e.g. [`StepGRPOTrainer`])."""
        advantages = inputs["advantages"]
        return advantages[rows, steps] if advantages.dim() == 2 else advantages

    def _velocity_kl_coef(self) -> float:
        return self.args.beta if self.args.kl_type == "velocity" else 0.0

    @cached_property
    def _sigma_max(self) -> float:
        """The grid's second sigma, `step`'s `sigma_max` (read once, not in every replayed chunk)."""
        return float(self.sigmas[1])

    def replay_step(self, latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
                    sigma_next: torch.Tensor, next_latents: torch.Tensor) -> StepOutput:
        """The rollout's stochastic step with `velocity`, replayed on the recorded ``x_j -> x_{j+1}`` (sigmas of the
        grid every rollout checked, so not checked again here: that would synchronise with the device)."""
        return step(self.args.sde_type, latents, velocity, sigma, sigma_next, self.args.noise_level,
                    sigma_max=self._sigma_max, prev_sample=next_latents, check_sigmas=False)

    def _transition_loss(self, inputs: dict[str, Any], transition: Transition) -> tuple[torch.Tensor, dict]:
        """The policy loss of one chunk: PPO's clipped surrogate with `_transition_advantages`."""
        t = transition
        return grpo_clip_loss(t.out.log_prob, inputs["log_probs"][t.rows, t.steps],
                              self._transition_advantages(inputs, t.rows, t.steps), self.args.clip_range)

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], chunk: int) -> torch.Tensor:
        args, cond = self.args, inputs["cond"]
        rows = torch.arange(len(inputs["log_probs"]), device=inputs["log_probs"].device)
        s = inputs["train_steps"][:, chunk]
        x, x_next = inputs["latents_before"][rows, s], inputs["latents_after"][rows, s]
        j = inputs["step_indices"].to(x.device)[rows, s]
        sigmas = self.sigmas.to(x.device)
        sigma, sigma_next = sigmas[j], sigmas[j + 1]
        v = self.velocity(model, x, sigma, cond)
        out = self.replay_step(x, v, sigma, sigma_next, x_next)
        transition = Transition(rows, s, x, x_next, sigma, sigma_next, cond, v, out, self.replay_step)
        loss, metrics = self._transition_loss(inputs, transition)
        if "approx_kl" in metrics:
            self._approx_kls = (*self._approx_kls, metrics["approx_kl"])
        v_ref = None
        if self._needs_reference():
            with torch.no_grad(), self.policy("ref") as ref:
                v_ref = self.velocity(ref, x, sigma, cond)
        if args.beta > 0 and args.kl_type == "sde_mean":
            kl = transition_kl(transition, v_ref).mean()
            loss = loss + args.beta * kl
            metrics["kl"] = kl.detach()
        loss = loss + self.reference_terms(x, sigma, cond, v, v_ref=v_ref, transition=transition)
        self._log_train_metrics(metrics)
        return loss


__all__ = ["DanceGRPOTrainer", "grpo_clip_loss"]
