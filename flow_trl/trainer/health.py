"""Loud warnings for runs that cannot learn: rollouts without a usable reward and gradients that stay exactly zero.

Each warning is given once per trainer, with its cause and what to change; the training itself goes on (an
abstained image gets advantage 0, so such a step trains nothing rather than producing NaN weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)

ZERO_GRAD_PATIENCE = 10  # consecutive optimizer steps with a gradient norm of exactly 0 before the warning


class RewardHealth:
    """Checks every rollout's rewards ``[N, num_funcs]`` (NaN: abstained) and warns once per trainer when every
    function abstained on every image (nothing to learn from) or when one function abstained on every image."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def check(self, rewards: torch.Tensor, names: Sequence[str]) -> None:
        abstained = torch.isnan(rewards).all(dim=0)
        if abstained.all():
            self._warn_once(
                "",
                f"Every reward function ({', '.join(names)}) returned None/NaN for every image of this rollout: "
                "there is no reward to learn from, so every advantage is 0 and the step trains nothing. Check that "
                "the reward functions get the dataset columns they need and return numbers for these prompts.",
            )
            return
        for name, gone in zip(names, abstained.tolist()):
            if gone:
                self._warn_once(
                    name,
                    f"Reward function {name!r} returned None/NaN for every image of this rollout, so it contributes "
                    "nothing to the weighted reward. Check that it gets the dataset columns it needs and that it "
                    "applies to these prompts (it abstains with None by design otherwise).",
                )


class ZeroGradientCallback(TrainerCallback):
    """Warns once when the gradient norm that `Trainer` logs (``grad_norm``) has been exactly 0 for `patience`
    consecutive optimizer steps: the model is not learning.

    It reads the logged value only (no extra device sync). Steps between two logs count as zero when the later log's
    norm is 0, so with ``logging_steps > 1`` the count is that of the logs' last steps.
    """

    def __init__(self, patience: int = ZERO_GRAD_PATIENCE):
        if patience < 1:
            raise ValueError(f"patience must be >= 1; got {patience}.")
        self.patience = patience
        self._zero_steps = 0
        self._last_step = 0
        self._warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_step = state.global_step  # a resumed run counts from its checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        grad_norm = (logs or {}).get("grad_norm")
        if grad_norm is None or self._warned or not state.is_world_process_zero:
            return
        steps, self._last_step = state.global_step - self._last_step, state.global_step
        self._zero_steps = self._zero_steps + steps if grad_norm == 0 else 0
        if self._zero_steps >= self.patience:
            self._warned = True
            logger.warning(
                f"The gradient norm has been exactly 0 for {self._zero_steps} consecutive optimizer steps (up to step "
                f"{state.global_step}): the model is not learning. Likely causes: the rewards tie within every group "
                "(all advantages 0; see `frac_reward_zero_std`): raise `num_generations` or use a continuous reward; "
                "every reward function abstains (None/NaN): see the reward warnings above; or no trainable "
                "parameter reaches the loss: check `peft_config.target_modules` or `full_finetune_params`."
            )
