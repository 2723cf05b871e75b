"""Step-wise GRPO with a DRM (per-step advantages) for `accelerate launch` (the same as `flow-trl step_grpo`).

    # the shapes world, CPU: first train the DRM (writes shapes-drm/), then Step-GRPO with it
    python examples/scripts/drm.py
    python examples/scripts/step_grpo.py

    # a real model with a DRM trained by examples/scripts/drm.py
    accelerate launch examples/scripts/step_grpo.py \
        --model stabilityai/stable-diffusion-3.5-medium --dataset_name my-org/my-prompts \
        --drm_model_name_or_path sd35-drm --reward_funcs my_package.rewards.hps \
        --step_advantage gain --resolution 512 --bf16 \
        --per_device_train_batch_size 8 --num_generations 8 --output_dir sd35-step-grpo

`--config cfg.yaml` reads the same flags from YAML; `--help` lists them all with their help text.
"""

from flow_trl.scripts.step_grpo import cli


if __name__ == "__main__":
    cli()
