"""Train with GRPO on SDE rollouts: `flow-trl dance_grpo` (alias `flow-trl grpo`) [--flags | --config cfg.yaml].

DanceGRPO by default; `--sde_type flow` gives Flow-GRPO, `--advantage_shaping slas` SLAS. With no `--model`, trains
a LoRA on the embedded shapes world and prints the held-out score before and after. With a model:

    accelerate launch examples/scripts/grpo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --reward_funcs my_pkg.rewards.hps my_pkg.rewards.clip --reward_weights 1 1 \\
        --advantage_shaping slas --output_dir sd35-grpo --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, TrainerScript


# The shapes-world recipe (measured figures: docs/benchmarks.md). A LoRA on a CPU budget needs a larger step than
# the references' (lr 3e-4, clip 1e-4): with those a dense sanity reward hardly moved in 60 steps, and clip 1e-4
# clipped about 40% of the second micro-batch of each rollout. `timestep_fraction` 0.4 trains 4 of the 9 stochastic
# transitions of the 10 steps per sample.
SHAPES_GRPO_DEFAULTS: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-grpo",
    "learning_rate": 3e-3,
    "clip_range": 1e-3,
    "timestep_fraction": 0.4,
}


SCRIPT = TrainerScript("dance_grpo", "DanceGRPOTrainer", "DanceGRPOConfig", SHAPES_GRPO_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
