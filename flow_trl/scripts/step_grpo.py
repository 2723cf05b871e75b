"""Train with Step-wise GRPO: `flow-trl step_grpo [--flags | --config cfg.yaml]`.

GRPO whose advantages are per step, from a diffusion-based reward model (DRM) scoring every stored state. With no
`--model`, trains a LoRA on the embedded shapes world with the DRM that `flow-trl drm` writes to `shapes-drm/`
(the shapes score is the logged terminal reward and the held-out metric) and prints the held-out score before and
after. With a model:

    accelerate launch examples/scripts/step_grpo.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --drm_model_name_or_path my-drm --reward_funcs my_pkg.rewards.hps \\
        --output_dir sd35-step-grpo --bf16
"""

from __future__ import annotations

from typing import Any

from .grpo import SHAPES_GRPO_LORA_RECIPE
from .utils import TrainerScript


# The shapes-world recipe: GRPO's (lr 3e-3, clip 1e-3, 4 of the 9 stochastic steps), the DRM of `flow-trl drm`.
SHAPES_STEP_GRPO_DEFAULTS: dict[str, Any] = {
    **SHAPES_GRPO_LORA_RECIPE,
    "output_dir": "shapes-step-grpo",
    "drm_model_name_or_path": "shapes-drm",
}


SCRIPT = TrainerScript("step_grpo", "StepGRPOTrainer", "StepGRPOConfig", SHAPES_STEP_GRPO_DEFAULTS)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
