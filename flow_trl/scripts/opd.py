"""Distil task teachers into one student with Flow-OPD: `flow-trl opd [--flags | --config cfg.yaml]`.

Teachers are LoRAs of the same base model, one per task, given as `--teachers task=path ...` and routed by the
dataset column `--task_column`. With a model:

    accelerate launch examples/scripts/opd.py --model stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name my/prompts --task_column task --teachers geneval=teachers/geneval ocr=teachers/ocr \\
        --reward_funcs my_pkg.rewards.geneval --cold_start merge --lora_r 32 --lora_alpha 64 --output_dir sd35-opd

With no `--model`, the shapes world: two teachers, one on the object families (single_object, two_object,
counting) and one on the attribute families (colors, position, color_attr), read from `--teacher_dir`
(`<output_dir>/teachers` by default). Missing ones are first trained there with `flow-trl nft`'s recipe
(`SHAPES_NFT_DEFAULTS`: every linear weight, exported as an exact rank-128 LoRA) on their families
(`--teacher_max_steps` steps each); with `--train_teachers false`, missing teachers are an error. The student's LoRA
takes the teachers' shape (rank, alpha and adapted modules) and starts as their model soup (`merge_deltas`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..cli import UsageError
from ..lora import lora_shape, read_lora
from .grpo import SHAPES_GRPO_LORA_RECIPE
from .nft import SHAPES_NFT_DEFAULTS
from .utils import (
    ScriptArguments,
    TrainerScript,
    quiet_loading,
)


# The shapes-world recipe: GRPO's LoRA geometry (32 images a step, clip 1e-3, 4 of the 9 stochastic steps),
# Flow-OPD's SDE (flow, eta 0.7) and MAR 0.04 to the base model; the student, a LoRA of the teachers' shape (rank
# 128 on every linear layer), starts as the teachers' model soup and trains 30 steps at lr 3e-4 (docs/opd.md): the
# soup carries the gain, 50 and 200 steps scored within noise of 30, and 30 keeps teachers and student within 15
# minutes on two CPU cores.
SHAPES_OPD_DEFAULTS: dict[str, Any] = {
    **SHAPES_GRPO_LORA_RECIPE,
    "output_dir": "shapes-opd",
    "learning_rate": 3e-4,
    "task_column": "tag",
    "cold_start": "merge_deltas",
    "max_steps": 30,
}

# Which shapes-world families each teacher is trained on and routed: {teacher: families}.
SHAPES_TEACHER_FAMILIES: dict[str, tuple[str, ...]] = {
    "objects": ("single_object", "two_object", "counting"),
    "attributes": ("colors", "position", "color_attr"),
}
# What a teacher's training copies from the student's config (so that both sample the same way).
TEACHER_SHARED_FIELDS = ("num_inference_steps", "guidance_scale", "seed", "resolution", "dataloader_pin_memory")


@dataclass
class OPDScriptArguments(ScriptArguments):
    """[`ScriptArguments`] plus the shapes world's teachers."""

    teacher_dir: str | None = field(
        default=None,
        metadata={"help": "Shapes world: folder of the teachers (one subfolder each); <output_dir>/teachers."},
    )
    train_teachers: bool = field(
        default=True,
        metadata={"help": "Shapes world: train the teachers missing from --teacher_dir first (flow-trl nft's "
                  "recipe, --teacher_max_steps steps each; found ones are reused). false: missing ones are an error."},
    )
    teacher_max_steps: int = field(default=100, metadata={"help": "Shapes world: optimizer steps per teacher."})
    teacher_batch_size: int = field(
        default=64, metadata={"help": "Shapes world: images per teacher optimizer step (flow-trl nft's 64)."}
    )


def train_shapes_teacher(
    families: tuple[str, ...], output_dir: Path, script_args: OPDScriptArguments, student_args
) -> None:
    """Train one shapes-world teacher: `flow-trl nft`'s recipe on `families`' prompts (each family equally often),
    `script_args.teacher_max_steps` steps of `teacher_batch_size` images, sampling as the student does; saves the
    transformer and its exact LoRA export to `output_dir`."""
    from ..toy import SHAPES_PIPELINE_DIR, shapes_dataset
    from ..trainer import FlowNFTConfig, FlowNFTTrainer

    shared = {name: getattr(student_args, name) for name in TEACHER_SHARED_FIELDS}
    config_fields = {f.name for f in fields(FlowNFTConfig)}
    recipe = {key: value for key, value in SHAPES_NFT_DEFAULTS.items() if key in config_fields}  # not script flags
    args = FlowNFTConfig(
        **{**recipe, **shared, "output_dir": str(output_dir), "max_steps": script_args.teacher_max_steps,
           "per_device_train_batch_size": script_args.teacher_batch_size}
    )
    with quiet_loading():
        trainer = FlowNFTTrainer(
            model=str(SHAPES_PIPELINE_DIR),
            args=args,
            reward_funcs=script_args.reward_funcs,
            train_dataset=shapes_dataset("train", balanced=True).filter(lambda row: row["tag"] in families),
        )
    trainer.train()
    trainer.save_model(str(output_dir))


def match_teacher_lora(script_args: ScriptArguments, teacher: str) -> None:
    """Give the student's LoRA the shape of `teacher`'s (rank, alpha, adapted modules), which `FlowOPDTrainer`
    needs to load the teachers as adapters of the student."""
    rank, alpha, modules = lora_shape(*read_lora(teacher))
    script_args.lora_r, script_args.lora_alpha, script_args.lora_target_modules = rank, round(alpha), modules


def shapes_teachers(script_args: OPDScriptArguments, training_args) -> dict[str, str]:
    """`{family: teacher folder}` of the shapes world, training the missing ones (`--train_teachers`)."""
    root = Path(script_args.teacher_dir or Path(training_args.output_dir) / "teachers")
    teachers = {}
    for name, families in SHAPES_TEACHER_FAMILIES.items():
        folder = root / name
        if not (folder / "pytorch_lora_weights.safetensors").is_file():
            if not script_args.train_teachers:
                raise UsageError(
                    f"No shapes-world teacher {name!r} in {folder}. Let `flow-trl opd` train the teachers (drop "
                    "--train_teachers false: flow-trl nft's recipe on each teacher's families, --teacher_max_steps "
                    "steps), point --teacher_dir to existing ones, or pass --teachers family=path for every family."
                )
            train_shapes_teacher(families, folder, script_args, training_args)
        teachers.update({family: str(folder) for family in families})
    return teachers


class OPDTrainerScript(TrainerScript):
    """`flow-trl opd`: the shapes world's teachers are resolved (or trained) before the student."""

    def prepare(self, script_args: OPDScriptArguments, training_args) -> None:
        """On the shapes world with no `--teachers`, resolve the teachers (training missing ones)."""
        if script_args.model is None and not training_args.teachers:
            training_args.teachers = shapes_teachers(script_args, training_args)
            match_teacher_lora(script_args, next(iter(training_args.teachers.values())))


SCRIPT = OPDTrainerScript("opd", "FlowOPDTrainer", "FlowOPDConfig", SHAPES_OPD_DEFAULTS, OPDScriptArguments)
make_parser, main, cli = SCRIPT.make_parser, SCRIPT.main, SCRIPT.cli


if __name__ == "__main__":
    cli()
