"""Train with Diffusion-NFT: `flow-trl nft [--flags | --config cfg.yaml]`.

With no `--model`, trains a LoRA on the embedded shapes world (CPU-sized defaults, 13.5-23 minutes of training on 2
cores), printing the held-out GenEval-style score before and after and saving sample grids. With a model:

    accelerate launch examples/scripts/nft.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --reward_funcs my_pkg.rewards.pickscore --output_dir sd35-nft --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, TrainerScript


# The shapes-world recipe: 250 steps of 64 images, 8.7-9.6 minutes of training on this project's fast 2-core machine
# (slower CPUs take longer, docs/benchmarks.md). It trains 3 of the 10 grid timesteps per sample (more samples
# for the same compute), drops the KL term, and samples the six GenEval families' training prompts equally often (the
# evaluation weighs them equally). Measured figures, and the runs behind these choices: docs/benchmarks.md.
SHAPES_NFT_DEFAULTS: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-nft",
    "max_steps": 250,
    "per_device_train_batch_size": 64,
    "balance_families": True,
    "learning_rate": 3e-3,
    "timestep_fraction": 0.3,
    "beta": 0.0,
    "nft_beta": 1.0,
}


SCRIPT = TrainerScript("FlowNFTTrainer", "FlowNFTConfig", SHAPES_NFT_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
