"""Train with GRPO on SDE rollouts: `flow-trl dance_grpo` (alias `flow-trl grpo`) [--flags | --config cfg.yaml].

DanceGRPO by default; `--sde_type flow_sde --noise_level 0.7` gives Flow-GRPO, `--sde_window_size 2` its Fast
variant, `--advantage_shaping slas` SLAS. With no `--model`, trains on the embedded shapes world with Flow-GRPO-Fast's
rollouts (`SHAPES_GRPO_DEFAULTS`) and prints the held-out score before and after. With a model:

    accelerate launch examples/scripts/grpo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --reward_funcs my_pkg.rewards.hps my_pkg.rewards.clip --reward_weights 1 1 \\
        --advantage_shaping slas --output_dir sd35-grpo --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, TrainerScript


# The LoRA recipe on the shapes world: DanceGRPO's SDE (eta 0.3) on every step, 32 images a step. A LoRA on a CPU
# budget needs a larger step than the references' (lr 3e-4, clip 1e-4): with those a dense sanity reward hardly moved
# in 60 steps, and clip 1e-4 clipped about 40% of the second micro-batch of each rollout. `timestep_fraction` 0.4
# trains 4 of the 9 stochastic transitions of the 10 steps per sample. It lowers the held-out score (docs/
# benchmarks.md); it is the recipe of the LoRA students of `flow-trl opd` and of `flow-trl step_grpo`.
SHAPES_GRPO_LORA_RECIPE: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-grpo",
    "learning_rate": 3e-3,
    "clip_range": 1e-3,
    "timestep_fraction": 0.4,
}

# `flow-trl dance_grpo`'s shapes-world recipe (measured figures: docs/benchmarks.md), Flow-GRPO-Fast's rollouts:
# the SDE (Flow-GRPO's, eta 0.7) on a window of 2 consecutive steps among the first 3, the ODE elsewhere, both window
# transitions trained; one initial noise per group, so a group's rewards differ only by the window's noise (the
# update's signal); 128 images a step (the papers use 288-1152) on family-balanced prompts, 100 steps; every linear
# layer's weight trained in full at NFT's lr; the published weights are their moving average (Diffusion-NFT's EMA
# 0.9, which averages out some of the last steps' noise), saved with an exact rank-128 LoRA next to the transformer.
SHAPES_GRPO_DEFAULTS: dict[str, Any] = {
    **SHAPES_GRPO_LORA_RECIPE,
    "use_peft": False,
    "full_finetune_params": "linear",
    "lora_export_rank": 128,
    "learning_rate": 5e-4,
    "sde_type": "flow_sde",
    "noise_level": 0.7,
    "sde_window_size": 2,
    "sde_window_range": [0, 3],
    "timestep_fraction": 0.99,
    "same_initial_noise": True,
    "per_device_train_batch_size": 128,
    "max_steps": 100,
    "balance_families": True,
    "weight_ema_decay": 0.9,
}


SCRIPT = TrainerScript("dance_grpo", "DanceGRPOTrainer", "DanceGRPOConfig", SHAPES_GRPO_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
