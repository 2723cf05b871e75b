"""What a flow_trl run leaves in its `output_dir`: recognise another run's outputs before a new run mixes with them,
keep a save from mixing LoRA and full weights, and check a checkpoint before resuming from it.

Only files flow_trl itself names are ever recognised or removed; anything else in the folder is the user's.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml
from huggingface_hub.repocard import metadata_load
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..hub import SAMPLE_GRID_NAME
from ..lora import LORA_WEIGHTS_NAME


logger = logging.get_logger(__name__)

TRANSFORMER_FOLDER = "transformer"
TRAINING_ARGS_NAME = "training_args.bin"
TRAINER_STATE_NAME = "trainer_state.json"
# flow_trl's own files in a checkpoint, beside what `Trainer` writes
POLICY_STATE_FILE = "flow_trl_policies.safetensors"
ALGORITHM_STATE_FILE = "flow_trl_state.json"  # what an algorithm adapts during training (e.g. SLAS gamma)
WEIGHT_EMA_FILE = "flow_trl_weight_ema.safetensors"
TRAINER_RECORD_FILE = "flow_trl_trainer.json"  # which trainer wrote a checkpoint, and its rollout count
# written by a run at its end: `save_model`, `save_state`, the model card and its grid, the CLI's held-out report
RUN_FILES = (LORA_WEIGHTS_NAME, TRAINING_ARGS_NAME, TRAINER_STATE_NAME, SAMPLE_GRID_NAME, "shapes_eval.json",
             "samples_after.png")
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")  # `Trainer`'s checkpoint folders
_EVAL_GRID = re.compile(r"^eval_step_\d+\.png$")  # `FlowRLTrainer.evaluate`'s grids under samples/


def previous_run_files(output_dir: str | os.PathLike) -> list[Path]:
    """The outputs of a flow_trl run in `output_dir` (sorted; `[]` for a missing or empty folder).

    They are the checkpoint folders (``checkpoint-<step>``), the saved weights (``pytorch_lora_weights.safetensors``,
    ``transformer/``), ``training_args.bin``, ``trainer_state.json``, a model card ``README.md`` tagged ``flow-trl``
    with its ``sample_grid.png``, evaluation grids ``samples/eval_step_<step>.png`` and the CLI's ``shapes_eval.json``
    and ``samples_after.png``. The CLI's ``samples_before.png`` is written by the new run before it trains and is not
    one of them.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    found += [folder / name for name in RUN_FILES if (folder / name).is_file()]
    if (folder / TRANSFORMER_FOLDER).is_dir():
        found.append(folder / TRANSFORMER_FOLDER)
    if _is_flow_trl_card(folder / "README.md"):
        found.append(folder / "README.md")
    if (folder / "samples").is_dir():
        found += [p for p in (folder / "samples").iterdir() if p.is_file() and _EVAL_GRID.match(p.name)]
    return sorted(found)


def prepare_output_dir(
    output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False, clear: bool = True
) -> None:
    """Make sure a new run in `output_dir` cannot mix with another run's outputs (`previous_run_files`).

    Resuming continues the run that is there: nothing is checked. Otherwise, outputs of another run raise a
    `FileExistsError` saying what to do, unless `overwrite` (the config's `overwrite_output_dir`), which removes them
    (where `clear`: the process that saves) so that the folder ends up with this run's outputs only. `FlowRLTrainer.
    train` calls it before training; a script can call it earlier to fail before any other work.
    """
    if resume or overwrite and not clear:  # nothing to refuse; the process that saves clears the folder
        return
    found = previous_run_files(output_dir)
    if not found:
        return
    names = ", ".join(str(p.relative_to(output_dir)) for p in found)
    if not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir} already holds the outputs of another run ({names}). Continue that run with "
            "resume_from_checkpoint (a checkpoint folder, or True for the last one), pick another output_dir, or "
            "set overwrite_output_dir=True to delete those outputs and start over."
        )
    logger.warning(f"overwrite_output_dir=True: deleting the previous run's outputs in {output_dir}: {names}.")
    for path in found:
        _remove(path)


def remove_stale_weights(folder: str | os.PathLike, writes_lora: bool, writes_transformer: bool) -> None:
    """Before a save writes its weights into `folder`, remove the other kind of weights an earlier save left there
    (a ``transformer/`` next to a new LoRA, or the reverse), so that the folder never holds weights of two runs.

    Only a folder an earlier flow_trl save wrote (it has ``training_args.bin``) is touched, and never a pipeline
    folder (``model_index.json``), whose ``transformer/`` is a model component.
    """
    folder = Path(folder)
    if not (folder / TRAINING_ARGS_NAME).is_file() or (folder / "model_index.json").exists():
        return
    if not writes_lora and (folder / LORA_WEIGHTS_NAME).is_file():
        _remove(folder / LORA_WEIGHTS_NAME)
    if not writes_transformer and (folder / TRANSFORMER_FOLDER).is_dir():
        _remove(folder / TRANSFORMER_FOLDER)


def validate_checkpoint_dir(checkpoint: str | os.PathLike | bool, trainer) -> str:
    """The checkpoint folder `trainer.train(resume_from_checkpoint=checkpoint)` would resume from, checked up front.

    `True` means the last ``checkpoint-<step>`` folder in the trainer's `output_dir`, as in `Trainer.train`. The
    folder must hold everything this trainer loads: ``trainer_state.json``, the weights of its kind (the LoRA file
    with a `peft_config`, ``transformer/`` without), the extra policies of its algorithm and, with
    `weight_ema_decay`, the weight EMA. Call it before any expensive work (e.g. a baseline evaluation).

    Raises:
        FileNotFoundError: the path does not exist, `True` finds no checkpoint, or files are missing (all named).
        NotADirectoryError: the path is a file.
    """

    if checkpoint is True:
        output_dir = trainer.args.output_dir
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise FileNotFoundError(
                f"No checkpoint-<step> folder in output_dir {output_dir} to resume from. Pass the checkpoint folder "
                "itself, or start a new run without resume_from_checkpoint."
            )
        checkpoint = last
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"resume_from_checkpoint {checkpoint} does not exist. Pass a checkpoint-<step> folder from the output_dir "
            "of an earlier run of the same configuration."
        )
    if not path.is_dir():
        raise NotADirectoryError(
            f"resume_from_checkpoint {checkpoint} is not a folder: pass the checkpoint-<step> folder, not a file."
        )
    required = [TRAINER_STATE_NAME, trainer.policies.weights_name]
    if trainer._policy_adapters:
        required.append(POLICY_STATE_FILE)
    if trainer.weight_ema is not None:
        required.append(WEIGHT_EMA_FILE)
    has_transformer = any((path / TRANSFORMER_FOLDER).glob("*.safetensors"))
    missing = [name for name in required
               if not (has_transformer if name == f"{TRANSFORMER_FOLDER}/" else (path / name).is_file())]
    if missing:
        hints = {
            LORA_WEIGHTS_NAME: " It holds full weights: resume without a peft_config." if has_transformer else "",
            f"{TRANSFORMER_FOLDER}/": " It holds a LoRA: resume with the run's peft_config."
            if (path / LORA_WEIGHTS_NAME).is_file() else "",
            WEIGHT_EMA_FILE: " It was saved without a weight EMA: resume with weight_ema_decay=0.",
        }
        raise FileNotFoundError(
            f"{checkpoint} is not a checkpoint {type(trainer).__name__} can resume from: it lacks "
            f"{', '.join(missing)}.{''.join(hints.get(name, '') for name in missing)}"
        )
    return os.fspath(checkpoint)


def _is_flow_trl_card(path: Path) -> bool:
    """Whether `path` is a model card flow_trl wrote (its metadata has the ``flow-trl`` tag)."""
    if not path.is_file():
        return False
    try:
        metadata = metadata_load(path) or {}
    except (ValueError, yaml.YAMLError):  # front matter that is not a YAML mapping: not a card flow_trl wrote
        return False
    return "flow-trl" in (metadata.get("tags") or [])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


__all__ = ["prepare_output_dir", "previous_run_files", "remove_stale_weights", "validate_checkpoint_dir"]
