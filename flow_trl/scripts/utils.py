"""Argument parsing shared by the training scripts: dataclasses from flags and/or a YAML file."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
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
        metadata={
            "help": "Built-in reward names (e.g. shapes, pickscore, hpsv2; docs/rewards.md), reward server URLs "
            "(http://host:port/score) or dotted import paths to reward functions."
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (False: full fine-tuning)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names LoRA adapts; the model family's attention projections if unset."}
    )
    lora_init: str = field(default="gaussian", metadata={"help": "LoRA initialisation (peft `init_lora_weights`)."})
    balance_families: bool = field(
        default=False,
        metadata={
            "help": "Shapes world only: repeat each GenEval family's training prompts up to the size of the largest "
            "family, so the six families are trained as often as the evaluation weighs them (two thirds of the "
            "train split are color_attr prompts)."
        },
    )
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


# Shapes-world settings every trainer's recipe shares (used when no --model is given; flags and --config override):
# LoRA r16 (ScriptArguments), 200 optimizer steps of 32 images, 4 prompts x 8 images per rollout over 2 steps.
SHAPES_COMMON_DEFAULTS: dict[str, Any] = {
    "max_steps": 200,
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "steps_per_generation": 2,
    "num_inference_steps": 10,
    "guidance_scale": 1.0,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "num_images_to_log": 0,
}


def build_peft_config(script_args: ScriptArguments):
    """The `LoraConfig` the flags describe (target modules default to the model family's), or None."""
    if not script_args.use_peft:
        return None
    from peft import LoraConfig

    init = True if script_args.lora_init == "default" else script_args.lora_init
    return LoraConfig(
        r=script_args.lora_r,
        lora_alpha=script_args.lora_alpha,
        init_lora_weights=init,
        target_modules=script_args.lora_target_modules,
    )


def load_prompt_datasets(script_args: ScriptArguments):
    """(train, eval) datasets: the shapes world's prompt splits, or `datasets.load_dataset(dataset_name)`."""
    if script_args.dataset_name is None:
        if script_args.model is not None:
            raise ValueError(
                f"--model {script_args.model} needs prompts: pass --dataset_name (a `datasets.load_dataset` name or "
                "path with a `prompt` column). Without --model, the shapes world's prompts are used."
            )
        from ..toy import shapes_dataset

        eval_ds = shapes_dataset(script_args.dataset_test_split) if script_args.dataset_test_split else None
        return shapes_dataset(script_args.dataset_train_split, balanced=script_args.balance_families), eval_ds
    from datasets import load_dataset

    data = load_dataset(script_args.dataset_name)
    test = script_args.dataset_test_split
    return data[script_args.dataset_train_split], (data[test] if test and test in data else None)


def shapes_report(trainer, script_args: ScriptArguments, tag: str) -> dict[str, float]:
    """Held-out shapes metrics of the trainer's current policy, with its sampling settings; saves a grid."""
    from ..toy import evaluate_pipeline

    out = Path(trainer.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return evaluate_pipeline(
        trainer.pipe,
        num_per_family=script_args.eval_num_per_family,
        seed=trainer.args.eval_seed,
        num_inference_steps=trainer.args.num_inference_steps,
        guidance_scale=trainer.args.guidance_scale,
        grid_path=out / f"samples_{tag}.png",
    )


def print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    from ..toy.world import TAGS

    print(f"\nheld-out shapes score (GenEval partial credit)\n{'family':<15}{'before':>8}{'after':>8}")
    for tag in TAGS:
        print(f"{tag:<15}{before[f'score/{tag}']:>8.3f}{after[f'score/{tag}']:>8.3f}")
    for key in ("score", "strict", "quality"):
        print(f"{key:<15}{before[key]:>8.3f}{after[key]:>8.3f}")


def shapes_card_table(before: dict[str, float], after: dict[str, float]) -> dict[str, str]:
    """The before/after held-out shapes figures as model-card rows."""
    from ..toy.world import TAGS

    keys = ["score", "strict", "quality", *(f"score/{tag}" for tag in TAGS)]
    return {f"shapes held-out {key} (base -> trained)": f"{before[key]:.3f} -> {after[key]:.3f}" for key in keys}


def build_trainer(trainer_class, script_args: ScriptArguments, training_args):
    """The `trainer_class` instance the flags describe (the shapes world when no `--model` is given)."""
    from ..toy import SHAPES_PIPELINE_DIR

    train_ds, eval_ds = load_prompt_datasets(script_args)
    return trainer_class(
        model=script_args.model or str(SHAPES_PIPELINE_DIR),
        args=training_args,
        reward_funcs=script_args.reward_funcs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        peft_config=build_peft_config(script_args),
    )


def run_training(trainer_class, script_args: ScriptArguments, training_args, trainer=None) -> dict[str, Any]:
    """Train `trainer_class` as the flags say; on the shapes world, report the held-out score before and after.

    `trainer`: an instance `build_trainer` made (e.g. with extra callbacks) to use instead of a new one. Returns
    ``{"before", "after"}`` shapes metrics (shapes world only) and the trainer's ``log_history``.
    """
    shapes = script_args.model is None
    if trainer is None:
        trainer = build_trainer(trainer_class, script_args, training_args)
    report: dict[str, Any] = {}
    if shapes and trainer.is_world_process_zero():
        report["before"] = shapes_report(trainer, script_args, "before")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history, for curves (benchmarks/nft_log_curves.py)
    card: dict[str, Any] = {}
    if shapes and trainer.is_world_process_zero():
        report["after"] = shapes_report(trainer, script_args, "after")
        print_before_after(report["before"], report["after"])
        Path(training_args.output_dir, "shapes_eval.json").write_text(json.dumps(report, indent=2))
        card["evaluation"] = shapes_card_table(report["before"], report["after"])
        card["sample_image"] = Path(training_args.output_dir, "samples_after.png")
    trainer.create_model_card(dataset_name=script_args.dataset_name, **card)
    if trainer.is_world_process_zero():
        print(f"adapter, model card (README.md) and sample grids are in {training_args.output_dir}/")
    if training_args.push_to_hub:
        trainer.push_to_hub()
    report["log_history"] = trainer.state.log_history
    return report


def parse_with_shapes_defaults(parser: FlowTrlParser, argv: list[str] | None, shapes_defaults: dict[str, Any]):
    """Parse flags/YAML; the shapes-world recipe's values are the defaults when no `--model` is given."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    defaults = shapes_defaults if not any(a == "--model" or a.startswith("--model=") for a in argv) else {}
    return parser.parse_args_and_config(argv, defaults=defaults)


@dataclass(frozen=True)
class TrainerScript:
    """One `flow-trl <command>`: which trainer and config it runs, and its shapes-world recipe."""

    trainer_class: str  # a name exported by flow_trl, e.g. "FlowNFTTrainer"
    config_class: str  # e.g. "FlowNFTConfig"
    shapes_defaults: dict[str, Any]

    def make_parser(self) -> FlowTrlParser:
        from .. import trainer

        return FlowTrlParser((ScriptArguments, getattr(trainer, self.config_class)))

    def main(self, script_args: ScriptArguments, training_args) -> dict[str, Any]:
        from .. import trainer

        return run_training(getattr(trainer, self.trainer_class), script_args, training_args)

    def cli(self, argv: list[str] | None = None) -> dict[str, Any]:
        """Parse flags/YAML (the shapes-world recipe when no model is given) and run."""
        return self.main(*parse_with_shapes_defaults(self.make_parser(), argv, self.shapes_defaults))
