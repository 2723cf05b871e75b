"""Train a diffusion-based reward model (DRM) for `accelerate launch` (the same as `flow-trl drm`).

    # the shapes world, CPU, a few minutes: pairs from the base model's samples, held-out accuracy per sigma
    python examples/scripts/drm.py

    # a real model: the first 21 blocks of SD3.5-medium on your preference pairs (prompt, chosen, rejected)
    accelerate launch examples/scripts/drm.py \
        --model stabilityai/stable-diffusion-3.5-medium --dataset_name my-org/my-preference-pairs \
        --num_blocks 21 --use_peft --lora_r 64 --lora_alpha 128 --loss_type thurstone \
        --resolution 512 --bf16 --per_device_train_batch_size 8 --output_dir sd35-drm

`--config cfg.yaml` reads the same flags from YAML; `--help` lists them all with their help text.
"""

from flow_trl.scripts.drm import cli


if __name__ == "__main__":
    cli()
