"""Train with Diffusion-NFT: `flow-trl nft [--flags | --config cfg.yaml]`.

With no `--model`, fine-tunes the embedded shapes world's tiny transformer (CPU-sized defaults, minutes on 2 cores)
and saves it with an exact LoRA export, printing the held-out GenEval-style score before and after and saving sample
grids. With a model:

    accelerate launch examples/scripts/nft.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --reward_funcs my_pkg.rewards.pickscore --output_dir sd35-nft --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, TrainerScript


# The LoRA recipe on the shapes world: 250 steps of 64 images, 3 of the 10 grid timesteps per sample (more samples
# for the same compute), no KL, the six GenEval families' training prompts sampled equally often (the evaluation
# weighs them equally). The full fine-tuning recipe below builds on it.
SHAPES_NFT_LORA_RECIPE: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-nft",
    "max_steps": 250,
    "per_device_train_batch_size": 64,
    "balance_families": True,
    "learning_rate": 3e-3,
    "timestep_fraction": 0.3,
    "beta": 0.0,
    "implicit_policy_strength": 1.0,
}

# `flow-trl nft`'s shapes-world recipe: the LoRA recipe's rollouts and loss, but the weights of every linear layer
# of the tiny transformer trained in full (lr 5e-4) for 150 steps, and published as an exact rank-128 LoRA
# (pytorch_lora_weights.safetensors, for pipe.load_lora_weights) next to the transformer. Measured figures:
# docs/benchmarks.md.
SHAPES_NFT_DEFAULTS: dict[str, Any] = {
    **SHAPES_NFT_LORA_RECIPE,
    "use_peft": False,
    "full_finetune_params": "linear",
    "lora_export_rank": 128,
    "learning_rate": 5e-4,
    "max_steps": 150,
}


SCRIPT = TrainerScript("nft", "FlowNFTTrainer", "FlowNFTConfig", SHAPES_NFT_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
