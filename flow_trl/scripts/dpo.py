"""Train with Diffusion-DPO: `flow-trl dpo [--flags | --config cfg.yaml]`.

Online (pairs from the policy's own rollouts, best vs worst of each group) on a prompt dataset; offline on a
preference dataset with `prompt`, `chosen` and `rejected` image columns. With no `--model`, trains online on the
embedded shapes world (the tiny transformer's linear weights, saved with an exact LoRA export) and prints the
held-out score before and after. With a model:

    accelerate launch examples/scripts/dpo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/preference-pairs --output_dir sd35-dpo --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, TrainerScript


# The shapes-world recipe (online; measured figures: docs/benchmarks.md): every linear layer's weight of the tiny
# transformer trained in full, as `flow-trl nft` does, published as an exact rank-128 LoRA next to the transformer.
SHAPES_DPO_DEFAULTS: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-dpo",
    "use_peft": False,
    "full_finetune_params": "linear",
    "lora_export_rank": 128,
    "learning_rate": 5e-4,
    "num_train_timesteps": 3,
}


SCRIPT = TrainerScript("dpo", "FlowDPOTrainer", "FlowDPOConfig", SHAPES_DPO_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
