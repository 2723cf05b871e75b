"""Advantage Weighted Matching training, for `accelerate launch` on one or many GPUs (the same as `flow-trl awm`).

    # the shapes world, CPU, a few minutes
    python examples/scripts/awm.py

    # a real model: SD3.5-medium with a reward of your own (any `fn(prompts, images, **columns)`)
    accelerate launch examples/scripts/awm.py \
        --model stabilityai/stable-diffusion-3.5-medium --dataset_name my-org/my-prompts \
        --reward_funcs my_package.rewards.my_reward --resolution 512 --bf16 \
        --per_device_train_batch_size 8 --num_generations 8 --output_dir sd35-awm

`--config cfg.yaml` reads the same flags from YAML; `--help` lists them all with their help text.
"""

from flow_trl.scripts.awm import cli


if __name__ == "__main__":
    cli()
