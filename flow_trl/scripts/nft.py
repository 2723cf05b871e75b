"""Train with Diffusion-NFT: `flow-trl nft [--flags | --config cfg.yaml]`.

With no `--model`, trains a LoRA on the embedded shapes world (CPU-sized defaults, a few minutes on a laptop),
printing the held-out GenEval-style score before and after and saving sample grids. With a model:

    accelerate launch examples/scripts/nft.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --reward_funcs my_pkg.rewards.pickscore --output_dir sd35-nft --bf16
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .utils import FlowTrlParser, ScriptArguments


# The shapes-world recipe (used when no --model is given; flags and --config override it): about 5 minutes on 2 CPU
# cores. It trains 3 of the 10 grid timesteps per sample (more samples for the same compute) and drops the KL term
# (no reference forward). Measured figures, and the runs behind these choices: docs/benchmarks.md.
SHAPES_NFT_DEFAULTS: dict[str, Any] = {
    "output_dir": "shapes-nft",
    "max_steps": 200,
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "steps_per_generation": 2,
    "learning_rate": 3e-3,
    "num_inference_steps": 10,
    "timestep_fraction": 0.3,
    "beta": 0.0,
    "nft_beta": 1.0,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "num_images_to_log": 0,
}


def make_parser() -> FlowTrlParser:
    from ..trainer import FlowNFTConfig

    return FlowTrlParser((ScriptArguments, FlowNFTConfig))


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
    """(train, eval) prompt datasets: the shapes world's splits, or `datasets.load_dataset(dataset_name)`."""
    if script_args.dataset_name is None:
        from ..toy import shapes_dataset

        eval_ds = shapes_dataset(script_args.dataset_test_split) if script_args.dataset_test_split else None
        return shapes_dataset(script_args.dataset_train_split), eval_ds
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


def main(script_args: ScriptArguments, training_args) -> dict[str, Any]:
    from ..toy import SHAPES_PIPELINE_DIR
    from ..trainer import FlowNFTTrainer

    shapes = script_args.model is None
    train_ds, eval_ds = load_prompt_datasets(script_args)
    trainer = FlowNFTTrainer(
        model=script_args.model or str(SHAPES_PIPELINE_DIR),
        args=training_args,
        reward_funcs=script_args.reward_funcs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        peft_config=build_peft_config(script_args),
    )
    report: dict[str, Any] = {}
    if shapes and trainer.is_world_process_zero():
        report["before"] = shapes_report(trainer, script_args, "before")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if shapes and trainer.is_world_process_zero():
        report["after"] = shapes_report(trainer, script_args, "after")
        _print_before_after(report["before"], report["after"])
        Path(training_args.output_dir, "shapes_eval.json").write_text(json.dumps(report, indent=2))
        print(f"adapter, sample grids and shapes_eval.json are in {training_args.output_dir}/")
    if training_args.push_to_hub:
        trainer.push_to_hub()
    report["log_history"] = trainer.state.log_history
    return report


def _print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    from ..toy.world import TAGS

    print(f"\nheld-out shapes score (GenEval partial credit)\n{'family':<15}{'before':>8}{'after':>8}")
    for tag in TAGS:
        print(f"{tag:<15}{before[f'score/{tag}']:>8.3f}{after[f'score/{tag}']:>8.3f}")
    for key in ("score", "strict", "quality"):
        print(f"{key:<15}{before[key]:>8.3f}{after[key]:>8.3f}")


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags/YAML (shapes-world defaults when no model is given) and run."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = make_parser()
    defaults = SHAPES_NFT_DEFAULTS if not any(a == "--model" or a.startswith("--model=") for a in argv) else {}
    script_args, training_args = parser.parse_args_and_config(argv, defaults=defaults)
    return main(script_args, training_args)


if __name__ == "__main__":
    cli()
