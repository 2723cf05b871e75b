"""Train with Diffusion-DPO: `flow-trl dpo [--flags | --config cfg.yaml]`.

Online (pairs from the policy's own rollouts, best vs worst of each group) on a prompt dataset; offline on a
preference dataset with `prompt`, `chosen` and `rejected` image columns. With no `--model`, trains online on the
embedded shapes world and prints the held-out score before and after. With a model:

    accelerate launch examples/scripts/dpo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/preference-pairs --output_dir sd35-dpo --bf16
"""

from __future__ import annotations

from typing import Any

from .utils import SHAPES_COMMON_DEFAULTS, TrainerScript


# The shapes-world recipe (online; measured figures: docs/benchmarks.md).
SHAPES_DPO_DEFAULTS: dict[str, Any] = {
    **SHAPES_COMMON_DEFAULTS,
    "output_dir": "shapes-dpo",
    "learning_rate": 1e-3,
    "num_train_timesteps": 3,
}


SCRIPT = TrainerScript("dpo", "FlowDPOTrainer", "FlowDPOConfig", SHAPES_DPO_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
