"""`CheckpointMixin`: how a [`FlowRLTrainer`] saves its model and checkpoints and resumes from them.

Beyond `Trainer`'s files, a checkpoint holds a record of the trainer that wrote it (`TRAINER_RECORD_FILE`), the
algorithm's extra policies (`POLICY_STATE_FILE`), the weight EMA (`WEIGHT_EMA_FILE`) and what the algorithm adapts
while training (`ALGORITHM_STATE_FILE`); the trained weights are in diffusers format (see `Policies.save_weights`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .base_config import FlowRLConfig
from .outputs import (
    ALGORITHM_STATE_FILE,
    POLICY_STATE_FILE,
    TRAINER_RECORD_FILE,
    WEIGHT_EMA_FILE,
    remove_stale_weights,
)


class CheckpointMixin:
    """Saving and resuming for [`FlowRLTrainer`] (which provides `policies`, `weight_ema`, `_rollouts`, `_name`,
    `_policy_adapters`, `pipe` and `Trainer`'s `args` and `state`)."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save the trained weights in diffusers format: a LoRA `load_lora_weights` accepts, or the transformer.

        Weights of the other kind that an earlier save left in `output_dir` are removed (`remove_stale_weights`).
        """
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        remove_stale_weights(output_dir, writes_lora=self.policies.writes_lora,
                             writes_transformer=not self.policies.is_lora)
        self.policies.save_weights(output_dir, type(self.pipe))
        torch.save(_without_tokens(self.args), os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, with flow_trl's training state (`_save_training_state`) written first.

        `Trainer` then adds the weights, optimizer and trainer state, pushes the folder (`hub_strategy="checkpoint"`)
        and only then rotates older checkpoints away (`save_total_limit`): every pushed checkpoint is complete, and a
        save that fails leaves the previous checkpoints in place. Its own partial folder is removed, so that
        `resume_from_checkpoint=True` finds the last complete checkpoint.
        """
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        is_new = not os.path.exists(folder)
        try:
            if self.args.should_save:
                self._save_training_state(folder)
            super()._save_checkpoint(model, trial)
        except BaseException:
            if is_new and self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def _save_training_state(self, folder: str) -> None:
        """Write what resuming needs beyond `Trainer`'s files into checkpoint `folder`: the trainer record, the extra
        policies, the weight EMA and the algorithm state."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        if self._policy_adapters:
            save_file(self.policies.state_dict(), os.path.join(folder, POLICY_STATE_FILE))
        if self.weight_ema is not None:
            save_file(self.weight_ema.state_dict(), os.path.join(folder, WEIGHT_EMA_FILE))
        algorithm_state = self._algorithm_state()
        if algorithm_state:
            with open(os.path.join(folder, ALGORITHM_STATE_FILE), "w") as f:
                json.dump(algorithm_state, f, indent=1)
        with open(os.path.join(folder, TRAINER_RECORD_FILE), "w") as f:
            json.dump(self._trainer_record(), f, indent=1)

    def _trainer_record(self) -> dict[str, Any]:
        """What a checkpoint must match to resume this trainer (algorithm, LoRA or full fine-tuning, policies), and
        the rollouts generated so far."""
        return {
            "algorithm": self._name,
            "trainer_class": type(self).__name__,
            "lora": self.policies.is_lora,
            "policies": list(self._policy_adapters),
            "num_rollouts": self._rollouts.count,
        }

    def _check_trainer_record(self, checkpoint: str) -> None:
        """Refuse a checkpoint another algorithm, or the other of LoRA and full fine-tuning, wrote; restore the
        rollout count. A checkpoint without a record (older flow_trl) is accepted with a warning."""
        path = os.path.join(checkpoint, TRAINER_RECORD_FILE)
        if not os.path.isfile(path):
            warnings.warn(
                f"{checkpoint} has no {TRAINER_RECORD_FILE} (saved by an older flow_trl), so it cannot be checked to "
                f"come from a {self._name} run; resuming anyway.",
                stacklevel=2,
            )
            return
        with open(path) as f:
            record = json.load(f)
        this = f"{type(self).__name__} ({self._name})"
        if record["algorithm"] != self._name:
            raise ValueError(
                f"{checkpoint} was saved by {record['trainer_class']} ({record['algorithm']}); {this} cannot resume "
                f"it. Resume it with {record['trainer_class']}, or start a new {self._name} run without "
                "resume_from_checkpoint (e.g. from the checkpoint's weights loaded into the pipeline)."
            )
        if record["lora"] != self.policies.is_lora:
            saved, wanted = ("LoRA", "pass the run's peft_config") if record["lora"] else (
                "full fine-tuning", "drop peft_config")
            raise ValueError(f"{checkpoint} was saved by a {saved} run; {this} cannot resume it as it is: {wanted}.")
        self._rollouts.count = record["num_rollouts"]

    def _algorithm_state(self) -> dict[str, Any]:
        """JSON-serialisable values the algorithm adapts while training, saved with each checkpoint (none here)."""
        return {}

    def _restore_algorithm_state(self, state: dict[str, Any]) -> None:
        """Inverse of `_algorithm_state`, called when resuming from a checkpoint that has one."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load what `_save`/`_save_checkpoint` wrote (diffusers-format weights and the extra policies)."""
        from safetensors.torch import load_file

        self._check_trainer_record(resume_from_checkpoint)
        self.policies.load_weights(resume_from_checkpoint)
        state_file = os.path.join(resume_from_checkpoint, ALGORITHM_STATE_FILE)
        if os.path.isfile(state_file):
            with open(state_file) as f:
                self._restore_algorithm_state(json.load(f))
        if self.weight_ema is not None:
            ema_file = os.path.join(resume_from_checkpoint, WEIGHT_EMA_FILE)
            if not os.path.isfile(ema_file):
                raise FileNotFoundError(
                    f"{ema_file} is missing: the checkpoint was saved without a weight EMA. Resume with "
                    "weight_ema_decay=0, or start a new run to average the weights."
                )
            self.weight_ema.load_state_dict(load_file(ema_file))
        policy_file = os.path.join(resume_from_checkpoint, POLICY_STATE_FILE)
        if self._policy_adapters:
            if not os.path.isfile(policy_file):
                raise FileNotFoundError(f"{policy_file} is missing: this checkpoint cannot resume {self._name}.")
            self.policies.load_state_dict(load_file(policy_file), source=policy_file, owner=type(self).__name__)


def _without_tokens(args: FlowRLConfig) -> FlowRLConfig:
    """A shallow copy of `args` with every `*_token` field cleared, safe to write next to published weights."""
    clean = copy.copy(args)
    for name in vars(args):
        if name.endswith("_token"):
            setattr(clean, name, None)
    return clean


__all__ = ["ALGORITHM_STATE_FILE", "POLICY_STATE_FILE", "TRAINER_RECORD_FILE", "WEIGHT_EMA_FILE", "CheckpointMixin"]
