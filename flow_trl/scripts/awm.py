"""Train with Advantage Weighted Matching: `flow-trl awm [--flags | --config cfg.yaml]`.

With no `--model`, trains a LoRA on the embedded shapes world and prints the held-out score before and after.
With a model:

    accelerate launch examples/scripts/awm.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --reward_funcs my_pkg.rewards.geneval --output_dir sd35-awm --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, FlowTrlParser, ScriptArguments, parse_with_shapes_defaults, run_training


# The shapes-world recipe (measured figures: docs/benchmarks.md).
SHAPES_AWM_DEFAULTS: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-awm",
    "max_steps": 200,
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "steps_per_generation": 2,
    "learning_rate": 3e-3,
    "num_train_timesteps": 3,
    "beta": 0.0,
    "ema_beta": 0.0,
}


def make_parser() -> FlowTrlParser:
    from ..trainer import FlowAWMConfig

    return FlowTrlParser((ScriptArguments, FlowAWMConfig))


def main(script_args: ScriptArguments, training_args) -> dict[str, Any]:
    from ..trainer import FlowAWMTrainer

    return run_training(FlowAWMTrainer, script_args, training_args)


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags/YAML (shapes-world defaults when no model is given) and run."""
    return main(*parse_with_shapes_defaults(make_parser(), argv, SHAPES_AWM_DEFAULTS))


if __name__ == "__main__":
    cli()
