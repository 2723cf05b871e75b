"""Flow-OPD: on-policy distillation of task teachers into one student, for `accelerate launch` (the same as
`flow-trl opd`).

    # the shapes world, CPU: train the two teachers (objects, attributes) into shapes-opd/teachers, then the student
    python examples/scripts/opd.py

    # a real model: teachers are LoRAs of the same base (e.g. single-reward GRPO runs), routed by a dataset column
    accelerate launch examples/scripts/opd.py \
        --model stabilityai/stable-diffusion-3.5-medium --dataset_name my-org/my-prompts --task_column task \
        --teachers geneval=teachers/geneval ocr=teachers/ocr --reward_funcs my_package.rewards.task_reward \
        --cold_start merge --lora_r 32 --lora_alpha 64 --guidance_scale 4.5 --resolution 512 --bf16 \
        --per_device_train_batch_size 8 --num_generations 16 --output_dir sd35-opd

`--config cfg.yaml` reads the same flags from YAML; `--help` lists them all with their help text.
"""

from flow_trl.scripts.opd import cli


if __name__ == "__main__":
    cli()
