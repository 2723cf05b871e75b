"""Argument parsing shared by the training scripts: dataclasses from flags and/or a YAML file."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser


@dataclass
class ScriptArguments:
    """What to train and on what: the model, the prompts, the rewards and the LoRA shape."""

    model: str | None = field(
        default=None, metadata={"help": "Pipeline id or path. Unset: the shipped shapes-world pipeline."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Prompt dataset (`datasets.load_dataset` name or path). Unset: shapes world."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split with the training prompts."})
    dataset_test_split: str | None = field(
        default="test", metadata={"help": "Split with held-out prompts for evaluation (None: no evaluation)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["shapes"],
        metadata={"help": "Built-in reward names or dotted paths to reward functions."},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (False: full fine-tuning)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names LoRA adapts; the model family's attention projections if unset."}
    )
    lora_init: str = field(default="gaussian", metadata={"help": "LoRA initialisation (peft `init_lora_weights`)."})
    eval_num_per_family: int = field(
        default=48,
        metadata={"help": "Shapes world only: held-out samples per GenEval family in the before/after table."},
    )


class FlowTrlParser(HfArgumentParser):
    """`HfArgumentParser` with ``--config file.yaml``: YAML values become defaults, flags override them.

    Unknown YAML keys are an error (a typo must not be silently ignored); an ``env:`` mapping sets environment
    variables.
    """

    def parse_args_and_config(self, args: list[str] | None = None, defaults: dict[str, Any] | None = None):
        argv = list(args) if args is not None else sys.argv[1:]
        values = dict(defaults or {})
        if "--config" in argv:
            i = argv.index("--config")
            path = argv[i + 1]
            with open(path) as f:
                config = yaml.safe_load(f) or {}
            argv = argv[:i] + argv[i + 2 :]
            for key, value in (config.pop("env", None) or {}).items():
                os.environ[key] = str(value)
            known = {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"Unknown keys in {path}: {unknown}. Check their spelling against `--help`.")
            values.update(config)
        self.set_defaults(**values)
        for action in self._actions:  # a default from YAML satisfies a required flag
            if action.dest in values:
                action.required = False
        *outputs, remaining = self.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)} (`--help` lists every flag)")
        return tuple(outputs)
