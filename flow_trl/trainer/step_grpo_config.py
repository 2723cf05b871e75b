"""`StepGRPOConfig`: GRPO with per-step advantages from a diffusion-based reward model (Step-GRPO, DRM paper)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..advantages import STEP_ADVANTAGE_MODES
from .grpo_config import DanceGRPOConfig
from .validation import check_choice


@dataclass
class StepGRPOConfig(DanceGRPOConfig):
    r"""
    Configuration of [`StepGRPOTrainer`] (Step-wise GRPO of "DRM: Diffusion-based Reward Model With Step-wise
    Guidance", arXiv 2605.25661; the advantage rules are ours, docs/algorithms.md#step-advantages).

    Inherits every field of [`DanceGRPOConfig`] (the SDE, PPO clip, timestep fraction, KL). Step-GRPO fields:

    drm_model_name_or_path (`str`, *optional*):
        Path or Hub id of the [`DiffusionRewardModel`] that scores every stored state (e.g. the output of
        `flow-trl drm`). Required unless the trainer is given `drm=`.
    step_advantage (`str`, defaults to `"score"`):
        `"score"` (option A): per step j, group-normalise `DRM(x_{j+1})`; `"gain"` (option B): group-normalise
        `DRM(x_{j+1}) - DRM(x_j)`. Each step's states are scored at their own sigma.
    terminal_reward_weight (`float`, defaults to `0.0`):
        Mix `(1 - w) A_step + w A_terminal`, where `A_terminal` is GRPO's group advantage of the weighted reward
        functions on the final images (0: per-step only, the reward functions are then logged and evaluated only;
        1: plain GRPO).
    """

    drm_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Path or Hub id of the DiffusionRewardModel that scores every state."}
    )
    step_advantage: str = field(
        default="score",
        metadata={"help": "'score': normalise DRM(x_{j+1}) per step; 'gain': DRM(x_{j+1}) - DRM(x_j)."},
    )
    terminal_reward_weight: float = field(
        default=0.0, metadata={"help": "Weight w of the terminal GRPO advantage in (1 - w) A_step + w A_terminal."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("step_advantage", self.step_advantage, STEP_ADVANTAGE_MODES)
        if not 0 <= self.terminal_reward_weight <= 1:
            raise ValueError(f"terminal_reward_weight must be in [0, 1]; got {self.terminal_reward_weight}.")
        if self.advantage_shaping != "none":
            raise ValueError("Step-GRPO normalises each step's scores per group; advantage_shaping must be 'none'.")
