"""Diffusion-DPO training, online or offline, for `accelerate launch` on one or many GPUs (= `flow-trl dpo`).

    # the shapes world, online (pairs from the policy's own samples), CPU, a few minutes
    python examples/scripts/dpo.py

    # offline: a preference dataset with `prompt`, `chosen` and `rejected` image columns (TRL's format)
    accelerate launch examples/scripts/dpo.py \
        --model stabilityai/stable-diffusion-3.5-medium --dataset_name my-org/my-preference-pairs \
        --resolution 512 --bf16 --per_device_train_batch_size 8 --output_dir sd35-dpo

    # online with a reward of your own (any `fn(prompts, images, **columns)`)
    accelerate launch examples/scripts/dpo.py \
        --model stabilityai/stable-diffusion-3.5-medium --dataset_name my-org/my-prompts \
        --reward_funcs my_package.rewards.my_reward --resolution 512 --bf16 \
        --per_device_train_batch_size 8 --num_generations 8 --output_dir sd35-dpo

`--config cfg.yaml` reads the same flags from YAML; `--help` lists them all with their help text.
"""

from flow_trl.scripts.dpo import cli


if __name__ == "__main__":
    cli()
