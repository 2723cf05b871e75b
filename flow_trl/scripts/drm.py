"""Train a diffusion-based reward model: `flow-trl drm [--flags | --config cfg.yaml]`.

With no `--model`: the DRM is the first 2 blocks of the shipped shapes pipeline plus a reward head, trained on
preference pairs built from the base model's own samples (each prompt sampled `--num_samples` times, pairs with a
shapes-score gap of at least `--min_gap`; `--max_prompts` samples fewer prompts); prints the held-out pairwise
accuracy at each noise level and saves the DRM with its model card to `shapes-drm/` (the default DRM of
`flow-trl step_grpo`). With a model and a preference dataset (`prompt`, `chosen`, `rejected` images):

    accelerate launch examples/scripts/drm.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/preference-pairs --num_blocks 21 --use_peft --output_dir sd35-drm --bf16
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from itertools import islice, zip_longest
from pathlib import Path
from typing import Any

from ..cli import UsageError
from .utils import (
    ScriptArguments,
    TrainerScript,
    build_peft_config,
    check_at_least,
    check_resume_checkpoint,
    load_dataset_splits,
    quiet_loading,
    resume_argument,
)


@dataclass
class DRMScriptArguments(ScriptArguments):
    """`ScriptArguments`, plus how shapes-world preference pairs are built (`reward_funcs` labels them)."""

    num_samples: int = field(default=4, metadata={"help": "Shapes world: base-model samples per prompt (>= 2)."})
    min_gap: float = field(default=0.25, metadata={"help": "Shapes world: minimum reward gap of a preference pair."})
    cross_prompt_samples: int = field(
        default=0,
        metadata={
            "help": "Shapes world: samples of other prompts of the same family added to each train prompt's pool, "
            "rescored against it (held-out pairs stay same-prompt)."
        },
    )
    max_prompts: int | None = field(
        default=None,
        metadata={
            "help": "Shapes world: sample at most this many prompts of each split, taken from its families in "
            "turn (all by default: 1,416 train and test images at --num_samples 4)."
        },
    )


# The shapes-world recipe (measured figures: docs/drm.md).
SHAPES_DRM_DEFAULTS: dict[str, Any] = {
    "output_dir": "shapes-drm",
    "use_peft": False,
    "max_steps": 1500,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "logging_steps": 50,
    "save_strategy": "no",
}


def spread(rows: list[dict[str, Any]], limit: int | None, column: str = "tag") -> list[dict[str, Any]]:
    """At most `limit` of `rows`, taken from each `column` value (the shapes world's family) in turn, so that every
    family is sampled even when the limit is small."""
    if limit is None or limit >= len(rows):
        return rows
    groups: dict[Any, list] = {}
    for row in rows:
        groups.setdefault(row[column], []).append(row)
    interleaved = (row for rank in zip_longest(*groups.values()) for row in rank if row is not None)
    return list(islice(interleaved, limit))


def counting_progress(reward_funcs, bar):
    """`reward_funcs` resolved, the first one advancing `bar` by the number of images it scores (each image is
    scored once by each function, so the bar counts scored images)."""
    from ..rewards import resolve_reward_funcs

    first, *rest = resolve_reward_funcs(reward_funcs)

    @functools.wraps(first)
    def scored(prompts, images, **columns):
        rewards = first(prompts, images, **columns)
        bar.update(len(prompts))
        return rewards

    return [scored, *rest]


def load_pair_datasets(script_args: DRMScriptArguments, pipe, disable_tqdm: bool = False):
    """(train, eval) preference datasets: pairs from the base model's shapes samples, or `--dataset_name`'s splits."""
    if script_args.dataset_name is None:
        from tqdm.auto import tqdm

        from ..drm import sample_preference_pairs
        from ..toy import split_prompts

        def pairs(split: str, seed: int, cross_prompt_samples: int = 0):
            rows = spread(split_prompts(split), script_args.max_prompts)
            total = len(rows) * (script_args.num_samples + cross_prompt_samples)
            with tqdm(total=total, desc=f"sampling {split} pairs", unit="img", disable=disable_tqdm) as bar:
                return sample_preference_pairs(
                    pipe,
                    rows,
                    counting_progress(script_args.reward_funcs, bar),
                    script_args.num_samples,
                    script_args.min_gap,
                    seed=seed,
                    cross_prompt_samples=cross_prompt_samples,
                    cross_prompt_column="tag",
                )

        test = script_args.dataset_test_split
        train = pairs(script_args.dataset_train_split, 0, script_args.cross_prompt_samples)
        return train, (pairs(test, 10**6) if test else None)
    return load_dataset_splits(script_args)


def check_script_args(script_args: DRMScriptArguments) -> None:
    if script_args.model is not None and script_args.dataset_name is None:
        raise UsageError("--model needs a preference dataset: pass --dataset_name (prompt, chosen, rejected).")
    if script_args.dataset_name is None:
        check_at_least("--num_samples", script_args.num_samples, minimum=2)  # a pair needs two samples
        if script_args.max_prompts is not None:
            check_at_least("--max_prompts", script_args.max_prompts)
    elif script_args.max_prompts is not None:
        raise UsageError("--max_prompts limits the shapes world's sampled prompts; with --dataset_name, select the "
                         "rows of your dataset instead.")


def main(script_args: DRMScriptArguments, training_args) -> dict[str, Any]:
    """Build the pairs, train, save the DRM and its model card, and report the held-out accuracy per sigma."""
    from ..models import load_pipeline
    from ..toy import SHAPES_PIPELINE_DIR
    from ..trainer import DRMTrainer

    check_script_args(script_args)
    check_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)  # before sampling
    with quiet_loading():
        pipe = load_pipeline(script_args.model or str(SHAPES_PIPELINE_DIR), training_args.model_init_kwargs)
    train_ds, eval_ds = load_pair_datasets(script_args, pipe, training_args.disable_tqdm)
    trainer = DRMTrainer(
        pipe,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        peft_config=build_peft_config(script_args),
    )
    trainer.train(resume_from_checkpoint=resume_argument(training_args.resume_from_checkpoint))
    trainer.save_model(training_args.output_dir)
    report: dict[str, Any] = {"train_pairs": len(trainer.train_dataset)}
    if eval_ds is not None:
        report.update(eval_pairs=len(eval_ds), **trainer.evaluate())
        if trainer.is_world_process_zero():
            print(f"\nheld-out pairwise accuracy ({len(trainer.eval_dataset)} pairs)\n{'sigma':<8}{'accuracy':>9}")
            for sigma in training_args.eval_sigmas:
                print(f"{sigma:<8.2f}{report[f'eval_accuracy@{sigma:.2f}']:>9.3f}")
            Path(training_args.output_dir, "drm_eval.json").write_text(json.dumps(report, indent=2))
    trainer.create_model_card(dataset_name=script_args.dataset_name, reward_funcs=script_args.reward_funcs)
    if trainer.is_world_process_zero():
        print(f"DRM and model card (README.md) saved to {training_args.output_dir}/ "
              "(DiffusionRewardModel.from_pretrained)")
    return report


class DRMScript(TrainerScript):
    """`flow-trl drm`: pairs are built (shapes world) or loaded before the DRM is trained."""

    def main(self, script_args: DRMScriptArguments, training_args) -> dict[str, Any]:
        return main(script_args, training_args)


SCRIPT = DRMScript("drm", "DRMTrainer", "DRMConfig", SHAPES_DRM_DEFAULTS, DRMScriptArguments)
make_parser, cli = SCRIPT.make_parser, SCRIPT.cli


if __name__ == "__main__":
    cli()
