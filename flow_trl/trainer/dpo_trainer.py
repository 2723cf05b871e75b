"""`FlowDPOTrainer`: Diffusion-DPO on the flow-matching velocity, online (own rollouts) or offline (a dataset)."""

from __future__ import annotations

import textwrap
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..advantages import best_worst_pairs
from ..models import cat_conditioning, index_conditioning
from ..preference import LATENT_COLUMNS, check_preference_dataset, encode_preference_dataset, is_preference_dataset
from ..timesteps import flow_matching_mse, flow_target, noise_latents, sample_training_sigmas
from .base_trainer import FlowRLTrainer
from .dpo_config import FlowDPOConfig
from .mixins import NormGuardMixin
from .rollout_buffer import RepeatSampler


def diffusion_dpo_loss(
    mse_chosen: torch.Tensor,
    mse_rejected: torch.Tensor,
    ref_mse_chosen: torch.Tensor,
    ref_mse_rejected: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO's loss (docs/algorithms.md#dpo), a pure function.

    The implicit rewards are ``-0.5 beta (mse - ref_mse)`` for the chosen (winner) and rejected (loser) samples;
    ``loss = mean -log sigmoid(chosen - rejected)`` over the valid pairs. Metrics follow TRL's DPOTrainer:
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (implicit accuracy: chosen > rejected) and
    ``rewards/margins``.

    Args:
        mse_chosen, mse_rejected: `[P]` flow-matching MSEs of the trained policy (with gradient).
        ref_mse_chosen, ref_mse_rejected: `[P]` MSEs of the DPO reference at the same inputs (no gradient).
        beta: the DPO temperature. valid: `[P]` bool mask of pairs that carry a preference (all by default).
    """
    chosen = -0.5 * beta * (mse_chosen.float() - ref_mse_chosen.float().detach())
    rejected = -0.5 * beta * (mse_rejected.float() - ref_mse_rejected.float().detach())
    margins = chosen - rejected
    weight = torch.ones_like(margins) if valid is None else valid.float()
    count = weight.sum().clamp(min=1.0)
    loss = (-F.logsigmoid(margins) * weight).sum() / count

    def masked_mean(values: torch.Tensor) -> torch.Tensor:
        return (values.detach() * weight).sum() / count

    metrics = {
        "rewards/chosen": masked_mean(chosen),
        "rewards/rejected": masked_mean(rejected),
        "rewards/accuracies": masked_mean((margins > 0).float()),
        "rewards/margins": masked_mean(margins),
    }
    return loss, metrics


class _ReferenceRefresh(TrainerCallback):
    """Copies the trained policy into the DPO reference after every `ref_update_steps`-th optimizer step, whatever the
    rollout boundaries (before the next micro-batch, and so before a rollout that the reference samples)."""

    def __init__(self, trainer: FlowDPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_update_steps == 0:
            self.trainer.policies.copy("default", "dpo_ref")


class FlowDPOTrainer(NormGuardMixin, FlowRLTrainer):
    """Trainer for Diffusion-DPO ([Diffusion Model Alignment Using Direct Preference
    Optimization](https://huggingface.co/papers/2311.12908)) on flow-matching models.

    - **Offline**: `train_dataset` has `prompt`, `chosen` and `rejected` (images), TRL's preference format. The images
      are encoded once through the VAE; `reward_funcs` are optional (used only for evaluation).
    - **Online**: `train_dataset` has prompts only. Each rollout samples `num_generations` images per prompt (with
      the trained policy or the DPO reference), scores them, and pairs each group's best image with its worst
      (and, with `pairs_per_group` > 1, the next best with the next worst).

    Winner and loser of a pair are noised with the same sigma and the same noise; the DPO reference is the base
    model, or a copy of the policy refreshed every `ref_update_steps`.

    Example:

    ```python
    from peft import LoraConfig
    from flow_trl import FlowDPOConfig, FlowDPOTrainer
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_preference_dataset

    trainer = FlowDPOTrainer(
        model=str(SHAPES_PIPELINE_DIR),
        args=FlowDPOConfig(output_dir="shapes-dpo", max_steps=100),
        train_dataset=shapes_preference_dataset("train"),
        peft_config=LoraConfig(r=16, lora_alpha=32),
    )
    trainer.train()
    ```

    Args: see [`FlowRLTrainer`]; `args` is a [`FlowDPOConfig`].
    """

    config_class = FlowDPOConfig
    _dpo_reference = "ref"  # the policy whose MSEs the DPO loss compares against ("dpo_ref" with ref_update_steps)
    _tag_names = ["flow-trl", "diffusers", "text-to-image", "dpo"]
    _name = "DPO"
    # docstyle-ignore
    _paper = {
        "title": "Diffusion Model Alignment Using Direct Preference Optimization",
        "id": "2311.12908",
        "citation": textwrap.dedent("""\
            @inproceedings{wallace2024diffusiondpo,
                title     = {{Diffusion Model Alignment Using Direct Preference Optimization}},
                author    = {Bram Wallace and Meihua Dang and Rafael Rafailov and Linqi Zhou and Aaron Lou and
                             Senthil Purushwalkam and Stefano Ermon and Caiming Xiong and Shafiq Joty and
                             Nikhil Naik},
                booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition},
                year      = {2024},
            }"""),
    }

    def __init__(self, model, args: FlowDPOConfig | None = None, reward_funcs=None, train_dataset=None,
                 eval_dataset=None, callbacks=None, optimizers=(None, None), peft_config=None):
        args = args if args is not None else self._default_args(model)
        self.offline = train_dataset is not None and is_preference_dataset(train_dataset)
        if self.offline:
            check_preference_dataset(train_dataset)
        if isinstance(args, FlowDPOConfig):  # anything else is refused by FlowRLTrainer with a clear message
            if self.offline and args.pairs_per_group != 1:
                raise ValueError(
                    "pairs_per_group applies to online DPO (pairs from the trainer's own groups); an offline "
                    "preference dataset already gives its pairs: leave pairs_per_group at 1."
                )
            if not self.offline:
                args.use_online_defaults()
            # the DPO reference: the base model, or a lagged copy of the policy refreshed every ref_update_steps
            if args.ref_update_steps is not None:
                self._dpo_reference, self._policy_adapters = "dpo_ref", ("dpo_ref",)
            if not self.offline and args.rollout_policy == "reference":
                self._sampling_policy = self._dpo_reference
        super().__init__(model, args=args, reward_funcs=reward_funcs, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, optimizers=optimizers,
                         peft_config=peft_config)
        if self.args.ref_update_steps is not None:
            self.add_callback(_ReferenceRefresh(self))
        if self.offline:
            name = getattr(self.pipe, "name_or_path", None) or type(self.pipe).__name__
            with self.accelerator.main_process_first():
                self.train_dataset = encode_preference_dataset(
                    self.train_dataset, self.adapter.encode_images, self.resolution,
                    batch_size=self.args.per_device_train_batch_size, model_key=str(name),
                )

    def training_summary(self) -> dict[str, Any]:
        """As [`FlowRLTrainer`]; offline, the preference pairs trained on instead of images generated (none are)."""
        summary = super().training_summary()
        if self.offline:
            summary["pairs_seen"] = summary.pop("images_generated")
        return summary

    def _requires_reward_funcs(self, dataset) -> bool:
        return dataset is None or not is_preference_dataset(dataset)

    # ---- data --------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, dataset=None):
        if not self.offline:
            return super()._get_train_sampler(dataset)
        dataset = dataset if dataset is not None else self.train_dataset
        args = self.args  # one "rollout" = generation_batch_size pairs, served over steps_per_generation micro-batches
        return RepeatSampler(len(dataset), num_generations=1, prompts_per_generation=args.generation_batch_size,
                             repeat_count=args.num_iterations * args.steps_per_generation, seed=args.seed)

    def _generate_and_score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.offline:
            return super()._generate_and_score(rows)
        cond = self.encode_prompts([row["prompt"] for row in rows])
        device = next(iter(cond.values())).device
        pairs = torch.stack([torch.stack([torch.as_tensor(row[c]) for c in LATENT_COLUMNS]) for row in rows])
        pairs = pairs.to(device, torch.float32)
        valid = torch.ones(len(rows), dtype=torch.bool, device=device)
        return self._pair_inputs(cond, pairs, valid, self._rollout_generator())

    def _prepare_training_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Online: each group's `pairs_per_group` rank-matched pairs `latents[p] = (winner, loser)`."""
        winners, losers, valid = best_worst_pairs(
            inputs["rewards"].cpu(), self.args.num_generations, self.args.pairs_per_group
        )
        latents = inputs["latents"]
        pairs = torch.stack([latents[winners.to(latents.device)], latents[losers.to(latents.device)]], dim=1)
        margin = (inputs["rewards"][winners] - inputs["rewards"][losers])[valid]
        self._metrics["train"]["dpo/valid_pair_frac"].append(valid.float().mean().item())
        if len(margin):
            self._metrics["train"]["dpo/reward_gap"].append(margin.mean().item())
        cond = index_conditioning(inputs["cond"], winners.to(latents.device))
        return self._pair_inputs(cond, pairs, valid.to(latents.device), generator)

    def _pair_inputs(self, cond, pairs: torch.Tensor, valid: torch.Tensor, generator: torch.Generator):
        """Training inputs of `P` pairs: the pair's prompt, its two latents, and sigmas/noise shared within it."""
        args = self.args
        sigmas = sample_training_sigmas(args.timestep_sampler, len(pairs), args.num_train_timesteps, self.sigmas,
                                        generator, shift=self.sigma_shift, shared=False)
        return {"cond": cond, "latents": pairs, "valid": valid,
                **self._forward_process_noise(pairs[:, 0], sigmas, generator)}

    # ---- training ----------------------------------------------------------------------------------------------

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any], chunk: int) -> torch.Tensor:
        pairs = inputs["latents"].float()
        x0 = torch.cat([pairs[:, 0], pairs[:, 1]])  # winners then losers
        sigma = inputs["train_sigmas"][:, chunk].repeat(2)  # shared by winner and loser
        noise = inputs["train_noise"][:, chunk].repeat(2, *([1] * (x0.dim() - 1)))
        cond = cat_conditioning([inputs["cond"], inputs["cond"]])
        x_t = noise_latents(x0, sigma, noise)
        target = flow_target(x0, noise)
        v_theta = self.velocity(model, x_t, sigma, cond)
        with torch.no_grad(), self.policy(self._dpo_reference) as reference:
            v_ref = self.velocity(reference, x_t, sigma, cond)
        mse, ref_mse = flow_matching_mse(v_theta, target), flow_matching_mse(v_ref, target)
        (mse_w, mse_l), (ref_w, ref_l) = mse.chunk(2), ref_mse.chunk(2)
        loss, metrics = diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, self.args.dpo_beta, inputs["valid"])
        metrics.update({"dpo/mse_chosen": mse_w.detach().mean(), "dpo/mse_rejected": mse_l.detach().mean()})
        base_velocity = v_ref if self._dpo_reference == "ref" else None  # reuse the base forward when it is one
        loss = loss + self.reference_terms(x_t, sigma, cond, v_theta, v_ref=base_velocity)
        self._log_train_metrics(metrics)
        return loss


__all__ = ["FlowDPOTrainer", "diffusion_dpo_loss"]
