"""GRPO on SDE rollouts (DanceGRPO, Flow-GRPO, SLAS) for `accelerate launch` (the same as `flow-trl grpo`).

    # the shapes world, CPU, a few minutes
    python examples/scripts/grpo.py

    # a real model: SD3.5-medium with a reward of your own (any `fn(prompts, images, **columns)`)
    accelerate launch examples/scripts/grpo.py \
        --model stabilityai/stable-diffusion-3.5-medium --dataset_name my-org/my-prompts \
        --reward_funcs my_package.rewards.hps my_package.rewards.clip --reward_weights 1 1 \
        --advantage_shaping slas --resolution 512 --bf16 \
        --per_device_train_batch_size 8 --num_generations 8 --output_dir sd35-grpo

`--config cfg.yaml` reads the same flags from YAML; `--help` lists them all with their help text.
"""

from flow_trl.scripts.grpo import cli


if __name__ == "__main__":
    cli()
