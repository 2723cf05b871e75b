"""Train with Advantage Weighted Matching: `flow-trl awm [--flags | --config cfg.yaml]`.

With no `--model`, fine-tunes the embedded shapes world's tiny transformer (its linear weights, saved with an exact
LoRA export) and prints the held-out score before and after.
With a model:

    accelerate launch examples/scripts/awm.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --reward_funcs my_pkg.rewards.geneval --output_dir sd35-awm --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, TrainerScript


# The shapes-world recipe (measured figures: docs/benchmarks.md): every linear layer's weight of the tiny transformer
# trained in full, as `flow-trl nft` does, published as an exact rank-128 LoRA next to the transformer. The LoRA
# recipe of the same rollouts (lr 1e-3) gained about half as much. The EMA-adapter KL (`ema_kl_coef`) stays on: without
# it a LoRA at lr 3e-3 collapsed within 100 steps.
SHAPES_AWM_DEFAULTS: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-awm",
    "use_peft": False,
    "full_finetune_params": "linear",
    "lora_export_rank": 128,
    "learning_rate": 2e-4,
    "num_train_timesteps": 3,
    "beta": 0.0,
    "ema_kl_coef": 1.0,
}


SCRIPT = TrainerScript("awm", "FlowAWMTrainer", "FlowAWMConfig", SHAPES_AWM_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
