"""Train with Diffusion-NFT: `flow-trl nft [--flags | --config cfg.yaml]`.

With no `--model`, trains a LoRA on the embedded shapes world (CPU-sized defaults, a few minutes on a laptop),
printing the held-out GenEval-style score before and after and saving sample grids. With a model:

    accelerate launch examples/scripts/nft.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --reward_funcs my_pkg.rewards.pickscore --output_dir sd35-nft --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, TrainerScript


# The shapes-world recipe: 5 to 18 minutes on 2 CPU cores, depending on the CPU. It trains 3 of the 10 grid
# timesteps per sample (more samples for the same compute) and drops the KL term (no reference forward). Measured
# figures, and the runs behind these choices: docs/benchmarks.md.
SHAPES_NFT_DEFAULTS: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-nft",
    "learning_rate": 3e-3,
    "timestep_fraction": 0.3,
    "beta": 0.0,
    "nft_beta": 1.0,
}


SCRIPT = TrainerScript("FlowNFTTrainer", "FlowNFTConfig", SHAPES_NFT_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
