"""`StepGRPOTrainer`: DanceGRPO whose advantages are per step, from a DRM scoring every stored state."""

from __future__ import annotations

import textwrap
from typing import Any

import torch

from ..advantages import ADVANTAGE_STDS, advantage_stats, clip_advantages, mix_advantages, step_advantages
from ..drm.model import DiffusionRewardModel
from ..drm.reward import DRMReward
from .grpo_trainer import DanceGRPOTrainer
from .step_grpo_config import StepGRPOConfig


class StepGRPOTrainer(DanceGRPOTrainer):
    """Step-wise GRPO: the rollouts, PPO-clipped loss and timestep selection of [`DanceGRPOTrainer`], with per-step
    advantages ``A[i, j]`` from a [`DiffusionRewardModel`] that scores each recorded state at its own sigma.

    Example:

    ```python
    from peft import LoraConfig
    from flow_trl import StepGRPOConfig, StepGRPOTrainer
    from flow_trl.toy import SHAPES_PIPELINE_DIR, shapes_dataset

    trainer = StepGRPOTrainer(
        model=str(SHAPES_PIPELINE_DIR),
        args=StepGRPOConfig(output_dir="shapes-step-grpo", drm_model_name_or_path="shapes-drm"),
        reward_funcs="shapes",                    # terminal reward: logged / evaluated (mixed in if weighted)
        train_dataset=shapes_dataset("train"),
        peft_config=LoraConfig(r=16, lora_alpha=32),
    )
    trainer.train()
    ```

    Args: as [`DanceGRPOTrainer`], plus
        drm ([`DiffusionRewardModel`] or `str`, *optional*): the step scorer (default: `args.drm_model_name_or_path`).
            It shares the generator's text encoders (it is built from the generator) and stays frozen.
        reward_funcs (*optional*): terminal reward functions; default: the DRM itself on the final images.
    """

    config_class = StepGRPOConfig
    _tag_names = ["flow-trl", "diffusers", "text-to-image", "grpo", "drm", "step-grpo"]
    _name = "StepGRPO"
    # docstyle-ignore
    _paper = {
        "title": "DRM: Diffusion-based Reward Model With Step-wise Guidance",
        "id": "2605.25661",
        "citation": textwrap.dedent("""\
            @article{drm2026,
                title   = {{DRM: Diffusion-based Reward Model With Step-wise Guidance}},
                author  = {Jiexuan Zhang and Binxin Yang and Hubery Yin and Chen Li and Jing Lyu},
                journal = {arXiv preprint arXiv:2605.25661},
                year    = {2026},
            }"""),
    }

    def __init__(
        self,
        model,
        args: StepGRPOConfig | None = None,
        reward_funcs=None,
        train_dataset=None,
        eval_dataset=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        drm: DiffusionRewardModel | str | None = None,
    ):
        drm = drm if drm is not None else getattr(args, "drm_model_name_or_path", None)
        if drm is None:
            raise ValueError(
                "StepGRPOTrainer needs a DiffusionRewardModel: pass `drm=` or set `drm_model_name_or_path` (train one "
                "with `flow-trl drm`)."
            )
        self._default_terminal = reward_funcs is None
        super().__init__(
            model,
            args=args,
            reward_funcs=reward_funcs,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        self.drm_reward = DRMReward(drm, self.pipe)
        self.drm_reward.drm.to(self.accelerator.device)
        if self._default_terminal:
            self.reward_funcs, self.reward_func_names = [self.drm_reward], [self.drm_reward.name]

    def _requires_reward_funcs(self, train_dataset) -> bool:
        """Without reward functions, the DRM on the final images is the terminal reward (set after loading)."""
        return False

    def _score_states(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DRM scores `[n, S]` of the states after each recorded step (at sigma_{j+1}) and, for `"gain"`, before it
        (at sigma_j)."""
        sigmas = self.sigmas.to(inputs["latents_after"].device)
        steps = inputs["step_indices"][0].to(sigmas.device)
        after, before = [], []
        for k, j in enumerate(steps.tolist()):
            after.append(self.drm_reward.score_latents(inputs["latents_after"][:, k], sigmas[j + 1], inputs["cond"]))
            if self.args.step_advantage == "gain":
                before.append(self.drm_reward.score_latents(inputs["latents_before"][:, k], sigmas[j], inputs["cond"]))
        return torch.stack(after, dim=1), (torch.stack(before, dim=1) if before else None)

    def _prepare_training_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Replace the terminal advantages `[n]` by per-step ones `[n, S]` (groups gathered whole over processes)."""
        inputs = super()._prepare_training_inputs(inputs, generator)
        args, n = self.args, len(inputs["log_probs"])
        after, before = self._score_states(inputs)
        all_after = self.accelerator.gather(after).cpu()
        all_before = self.accelerator.gather(before).cpu() if before is not None else None
        per_step = self._local_rows(
            step_advantages(all_after, args.num_generations, args.step_advantage, all_before, args.scale_rewards,
                            **ADVANTAGE_STDS[args.advantage_std]),
            n,
        )
        advantages = mix_advantages(per_step, inputs["advantages"].cpu(), args.terminal_reward_weight)
        advantages = clip_advantages(advantages, args.advantage_clip)
        metrics = {f"step_{k}": v for k, v in advantage_stats(advantages).items()}
        metrics["drm/final_state_score"] = all_after[:, -1].mean().item()
        metrics["drm/first_state_score"] = all_after[:, 0].mean().item()
        self._log_train_metrics(metrics)
        return {**inputs, "advantages": advantages.to(inputs["log_probs"].device)}


__all__ = ["StepGRPOTrainer"]
