"""Argument parsing shared by the training scripts: dataclasses from flags and/or a YAML file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl import TrlParser

from ..cli import UsageError, exit_on_usage_error


@dataclass
class ScriptArguments:
    """What to train and on what: the model, the prompts, the rewards and the LoRA shape."""

    model: str | None = field(
        default=None, metadata={"help": "Pipeline id or path. Unset: the shipped shapes-world pipeline."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset: a `datasets.load_dataset` name or path, or a `save_to_disk` folder. Unset: shapes "
                  "world."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split with the training prompts."})
    dataset_test_split: str | None = field(
        default="test", metadata={"help": "Split with held-out prompts for evaluation (None: no evaluation)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["shapes"],
        metadata={
            "help": "Built-in reward names (e.g. shapes, pickscore, hpsv2; docs/rewards.md), reward server URLs "
            "(http://host:port/score) or dotted import paths to reward functions."
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (False: full fine-tuning)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names LoRA adapts; the model family's attention projections if unset."}
    )
    lora_init: str = field(default="gaussian", metadata={"help": "LoRA initialisation (peft `init_lora_weights`)."})
    balance_families: bool = field(
        default=False,
        metadata={
            "help": "Shapes world only: repeat each GenEval family's training prompts up to the size of the largest "
            "family, so the six families are trained as often as the evaluation weighs them (two thirds of the "
            "train split are color_attr prompts)."
        },
    )
    eval_num_per_family: int = field(
        default=48,
        metadata={"help": "Shapes world only: held-out samples per GenEval family in the before/after table."},
    )


# Flags `flow-trl <command> --help` shows (those the command has, in this order); `--help-all` shows every flag.
COMMON_FLAGS = (
    "config", "model", "dataset_name", "reward_funcs", "output_dir", "max_steps", "learning_rate", "use_peft",
    "lora_r", "lora_alpha", "num_generations", "per_device_train_batch_size", "num_inference_steps", "teachers",
    "train_teachers", "drm_model_name_or_path", "num_samples", "max_prompts", "num_blocks", "eval_strategy",
    "eval_steps", "save_strategy", "resume_from_checkpoint", "seed", "bf16", "report_to", "push_to_hub", "help-all",
)


class _HelpAction(argparse.Action):
    """``-h/--help``: the common flags and a pointer to the rest; ``--help-all`` (``full=True``): every flag."""

    def __init__(self, option_strings, dest, full: bool = False, help: str | None = None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)
        self.full = full

    def __call__(self, parser, namespace, values, option_string=None):
        print(parser.format_help() if self.full else parser.format_common_help())
        parser.exit()


class _CompactHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag once (``--max_steps MAX_STEPS``, without its dashed alias)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{action.option_strings[0]} {self._format_args(action, action.dest.upper())}"


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """`convert`, except that the string ``None`` gives `None`."""

    def parse(value: str) -> Any:
        return None if value == "None" else convert(value)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


class FlowTrlParser(TrlParser):
    """TRL's [`~trl.TrlParser`] (``--config file.yaml``: YAML values become defaults, flags override them; an ``env:``
    mapping sets environment variables) with stricter, friendlier handling of what users get wrong.

    ``--config=file.yaml`` and ``--config`` anywhere among the flags work; a ``--config`` without a value is an error.
    YAML keys and values are checked like flags (an unknown key, a list for a single-valued flag or a value of the
    wrong type is an error: a typo must not be silently ignored). ``--help`` lists the common flags, ``--help-all``
    every flag. Mistakes raise [`UsageError`] (one line for the user) rather than exiting. ``--FLAG None`` unsets an
    optional flag, list-valued ones included (``--sde_window_size None --sde_window_range None``: no SDE window).
    """

    def __init__(self, dataclass_types, prog: str | None = None, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [--config FILE.yaml] [--FLAG VALUE ...]")
        super().__init__(dataclass_types, prog=prog, add_help=False, allow_abbrev=False, **kwargs)
        self.add_argument("-h", "--help", action=_HelpAction, help="Show the common flags and exit.")
        self.add_argument("--help-all", action=_HelpAction, full=True, help="Show every flag and exit.")
        self.add_argument(
            "--config",
            metavar="FILE.yaml",
            default=argparse.SUPPRESS,
            help="YAML mapping of flag names to values (flags given as well override it); an `env:` mapping in it "
            "sets environment variables.",
        )
        self._config_path: str | None = None  # the file `set_defaults_with_config` is reading, for its messages
        # Optional list-valued flags also take `None` (HfArgumentParser accepts it for single-valued ones only).
        nullable = {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.default is None}
        self._nullable_lists = set()
        for action in self._actions:
            if action.nargs in ("+", "*") and action.type is not None and action.dest in nullable:
                action.type = _none_or(action.type)
                self._nullable_lists.add(action.dest)

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, with an optional list flag given as ``None`` unset (a `UsageError` if other values follow)."""
        namespace, remaining = super().parse_known_args(args, namespace)
        for dest in self._nullable_lists:
            values = getattr(namespace, dest, None)
            if isinstance(values, list) and None in values:
                if values != [None]:
                    self.error(f"--{dest} None unsets the flag and takes no other value")
                setattr(namespace, dest, None)
        return namespace, remaining

    def error(self, message: str):
        raise UsageError(f"{message} (`{self.prog} --help-all` lists every flag)")

    def format_common_help(self) -> str:
        """The usage, the common flags (`COMMON_FLAGS`) with their help, and how to see every flag."""
        actions = [self._option_string_actions[f"--{name}"] for name in COMMON_FLAGS
                   if f"--{name}" in self._option_string_actions]
        formatter = _CompactHelpFormatter(prog=self.prog)
        formatter.add_usage(self.usage, [], [])
        formatter.add_text(self.description)
        formatter.start_section("common flags")
        formatter.add_arguments(actions)
        formatter.end_section()
        formatter.add_text(
            f"{len(self._actions)} flags in all (the trainer's config and transformers' TrainingArguments): "
            f"`{self.prog} --help-all` lists them with their help."
        )
        return formatter.format_help()

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        """`TrlParser`'s YAML defaults, each key and value checked as its flag would be first (a `UsageError` names
        the file and the key). Returns no remaining strings: an unknown key is an error, not left over."""
        path = self._config_path
        known = {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UsageError(f"Unknown keys in {path}: {unknown}. Check their spelling against `--help-all`.")
        return super().set_defaults_with_config(
            **{key: self._config_value(path, key, value) for key, value in config.items()}
        )

    def _config_value(self, path: str, key: str, value: Any) -> Any:
        """`value` as the flag `--key` would parse it (lists for multi-valued flags); a `UsageError` if it cannot."""
        action = self._option_string_actions[f"--{key}"]
        if value is None or isinstance(value, dict):  # dict-valued fields (e.g. model_init_kwargs) take mappings
            return value
        multiple = action.nargs in ("+", "*")
        if isinstance(value, list) and not multiple:
            raise UsageError(f"{path}: `{key}` takes one value, got the list {value!r}.")
        items = value if isinstance(value, list) else [value]
        values = [self._convert_config_value(path, key, action, item) for item in items]
        return values if multiple else values[0]

    @staticmethod
    def _convert_config_value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
        if action.type is None or isinstance(value, (list, dict)):
            return value
        try:
            converted = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "value")
            raise UsageError(f"{path}: `{key}: {value!r}` is not a valid {kind}.") from None
        if action.choices is not None and converted not in action.choices:
            raise UsageError(f"{path}: `{key}: {value!r}` is not one of {[str(c) for c in action.choices]}.")
        return converted

    def parse_args_and_config(self, args: list[str] | None = None, defaults: dict[str, Any] | None = None):
        """The dataclasses from `defaults`, then the ``--config`` file (``--config F`` or ``--config=F``), then the
        flags, each overriding the one before.

        ``--config`` is found with argparse, then handed to `TrlParser.parse_args_and_config` as the leading
        ``--config F`` it reads; its errors (a missing file, invalid YAML, a non-mapping, a config's own validation)
        become one-line `UsageError`s.
        """
        argv = list(args) if args is not None else sys.argv[1:]
        pre = argparse.ArgumentParser(prog=self.prog, add_help=False, allow_abbrev=False)
        pre.add_argument("--config", metavar="FILE.yaml")
        pre.error = self.error
        known, argv = pre.parse_known_args(argv)
        path = self._config_path = known.config
        if defaults:
            super().set_defaults_with_config(**defaults)
        if path is not None:
            argv = ["--config", path, *argv]
        try:
            *outputs, remaining = super().parse_args_and_config(argv, return_remaining_strings=True)
        except UsageError:
            raise
        except OSError as err:
            if path is None or err.filename != path:
                raise
            raise UsageError(f"--config {path}: {err.strerror}.") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
            raise UsageError(f"--config {path} is not valid YAML{where}: {problem}.") from None
        except ValueError as err:  # a non-mapping file or `env`, or a config's own validation (`__post_init__`)
            raise UsageError(str(err)) from None
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(outputs)


# Shapes-world settings every trainer's recipe shares (used when no --model is given; flags and --config override):
# LoRA r16 (ScriptArguments), 200 optimizer steps of 32 images, 4 prompts x 8 images per rollout over 2 steps.
SHAPES_COMMON_DEFAULTS: dict[str, Any] = {
    "max_steps": 200,
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "steps_per_generation": 2,
    "num_inference_steps": 10,
    "guidance_scale": 1.0,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "num_images_to_log": 0,
}


class _TorchvisionNoticeFilter(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version without torchvision: the
    diffusers pipelines import those processors, flow_trl does not use them, and the user has nothing to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_start() -> None:
    """Keep a command's output to what the user needs: no torchvision notice (see `_TorchvisionNoticeFilter`)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionNoticeFilter) for f in logger.filters):
        logger.addFilter(_TorchvisionNoticeFilter())


def quiet_loading():
    """`flow_trl.models.quiet_loading` (no loading bars), imported on first use: `--help` must not import torch."""
    from ..models import quiet_loading as quiet

    return quiet()


def check_at_least(flag: str, value: int, minimum: int = 1) -> None:
    """A command-line count must be at least `minimum`: a one-line `UsageError` otherwise."""
    if value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}; got {value}.")


def check_lora_paths(paths: list[str]) -> None:
    """Each LoRA must exist: a folder written by `save_model`/`save_lora_weights`, or its `.safetensors` file."""
    for path in paths:
        if not Path(path).exists():
            raise UsageError(f"--lora {path}: no such file or directory (pass a folder written by a flow-trl run, "
                             "or its pytorch_lora_weights.safetensors).")


def check_pipeline_dir(path: str | None) -> None:
    """A local pipeline folder (`--model` of evaluate/diagnose) must hold a `model_index.json`."""
    if path is not None and not Path(path, "model_index.json").is_file():
        raise UsageError(f"--model {path}: no pipeline there (no model_index.json); leave --model out for the "
                         "shipped shapes pipeline.")


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint`'s value for `Trainer.train`: ``true`` (any case) means the last checkpoint of
    `output_dir`, as `True` does in Python."""
    return True if isinstance(value, str) and value.lower() == "true" else value


def check_resume_checkpoint(value: str | bool | None, output_dir: str) -> None:
    """`--resume_from_checkpoint` must name a checkpoint folder (with ``trainer_state.json``), or be ``true`` with
    one in `output_dir`: checked before any sampling."""
    value = resume_argument(value)
    if value is None or value is False:
        return
    if value is True:
        if not any(Path(output_dir).glob("checkpoint-*/trainer_state.json")):
            raise UsageError(f"--resume_from_checkpoint true: no checkpoint-<step> folder in {output_dir} to resume "
                             "from. Pass the checkpoint folder itself, or start a new run without it.")
        return
    folder = Path(value)
    if not folder.is_dir():
        raise UsageError(f"--resume_from_checkpoint {value}: no such directory. Pass a checkpoint folder, "
                         "<output_dir>/checkpoint-<step> (saved with --save_strategy steps --save_steps N).")
    if not (folder / "trainer_state.json").is_file():
        found = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
        hint = f"; it has {found}: pass one of them" if found else ""
        raise UsageError(f"--resume_from_checkpoint {value} is not a checkpoint (no trainer_state.json){hint}.")


def check_run_outputs(trainer, resume: str | bool | None) -> str | bool | None:
    """Before any sampling: the checkpoint to resume from holds what `trainer` loads, and `output_dir` holds no
    other run's outputs (unless `--overwrite_output_dir`). Returns the checkpoint for `trainer.train`."""
    from ..trainer.outputs import prepare_output_dir, validate_checkpoint_dir

    try:
        if resume:
            resume = validate_checkpoint_dir(resume, trainer)
        prepare_output_dir(trainer.args.output_dir, resume=bool(resume), overwrite=trainer.args.overwrite_output_dir,
                           clear=False)
    except (FileNotFoundError, NotADirectoryError, FileExistsError) as err:
        raise UsageError(str(err)) from None
    return resume


def build_peft_config(script_args: ScriptArguments):
    """The `LoraConfig` the flags describe (target modules default to the model family's), or None."""
    if not script_args.use_peft:
        return None
    from peft import LoraConfig

    init = True if script_args.lora_init == "default" else script_args.lora_init
    return LoraConfig(
        r=script_args.lora_r,
        lora_alpha=script_args.lora_alpha,
        init_lora_weights=init,
        target_modules=script_args.lora_target_modules,
    )


def load_prompt_datasets(script_args: ScriptArguments):
    """(train, eval) datasets: the shapes world's prompt splits, or `dataset_name`'s (`load_dataset_dict`)."""
    if script_args.dataset_name is None:
        if script_args.model is not None:
            raise UsageError(
                f"--model {script_args.model} needs prompts: pass --dataset_name (a `datasets.load_dataset` name or "
                "path with a `prompt` column). Without --model, the shapes world's prompts are used."
            )
        from ..toy import shapes_dataset

        eval_ds = shapes_dataset(script_args.dataset_test_split) if script_args.dataset_test_split else None
        return shapes_dataset(script_args.dataset_train_split, balanced=script_args.balance_families), eval_ds
    return load_dataset_splits(script_args)


def load_dataset_splits(script_args: ScriptArguments):
    """(train, eval) splits of `--dataset_name` (`load_dataset_dict`); the eval split is None when absent."""
    data = load_dataset_dict(script_args.dataset_name)
    train = script_args.dataset_train_split
    if train not in data:
        raise UsageError(
            f"--dataset_name {script_args.dataset_name} has no split {train!r} (it has {sorted(data)}): pass "
            "--dataset_train_split with one of them."
        )
    test = script_args.dataset_test_split
    return data[train], (data[test] if test and test in data else None)


def load_dataset_dict(name: str):
    """`datasets.load_dataset(name)`, or `datasets.load_from_disk(name)` for a folder written by `save_to_disk` (a
    single saved `Dataset` becomes the `"train"` split), e.g. `flow-trl dpo --pairs_from_samples`' saved pairs."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    folder = Path(name)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        data = load_from_disk(str(folder))
        return data if isinstance(data, DatasetDict) else DatasetDict({"train": data})
    return load_dataset(name)


def shapes_report(trainer, script_args: ScriptArguments, tag: str) -> dict[str, float]:
    """Held-out shapes metrics of the trainer's current policy, with its sampling settings; saves a grid."""
    from ..toy import evaluate_pipeline

    out = Path(trainer.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return evaluate_pipeline(
        trainer.pipe,
        num_per_family=script_args.eval_num_per_family,
        seed=trainer.args.eval_seed,
        num_inference_steps=trainer.args.num_inference_steps,
        guidance_scale=trainer.args.guidance_scale,
        grid_path=out / f"samples_{tag}.png",
    )


def print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    from ..toy.world import TAGS

    print(f"\nheld-out shapes score (GenEval partial credit)\n{'family':<15}{'before':>8}{'after':>8}")
    for tag in TAGS:
        print(f"{tag:<15}{before[f'score/{tag}']:>8.3f}{after[f'score/{tag}']:>8.3f}")
    for key in ("score", "strict", "quality"):
        print(f"{key:<15}{before[key]:>8.3f}{after[key]:>8.3f}")


def shapes_card_table(before: dict[str, float], after: dict[str, float]) -> dict[str, str]:
    """The before/after held-out shapes figures as model-card rows."""
    from ..toy.world import TAGS

    keys = ["score", "strict", "quality", *(f"score/{tag}" for tag in TAGS)]
    return {f"shapes held-out {key} (base -> trained)": f"{before[key]:.3f} -> {after[key]:.3f}" for key in keys}


def build_trainer(trainer_class, script_args: ScriptArguments, training_args, train_dataset=None):
    """The `trainer_class` instance the flags describe (the shapes world when no `--model` is given); `train_dataset`
    replaces the flags' training dataset."""
    from ..toy import SHAPES_PIPELINE_DIR

    train_ds, eval_ds = load_prompt_datasets(script_args)
    train_ds = train_ds if train_dataset is None else train_dataset
    if training_args.eval_strategy == "no":  # the held-out prompts serve only the shapes world's before/after report
        eval_ds = None
    with quiet_loading():
        return trainer_class(
            model=script_args.model or str(SHAPES_PIPELINE_DIR),
            args=training_args,
            reward_funcs=script_args.reward_funcs,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            peft_config=build_peft_config(script_args),
        )


def end_distributed() -> None:
    """Destroy the process group `accelerate launch` started, if any, before the process exits: left to the
    interpreter's exit, gloo's threads can abort a finished run (`terminate called without an active exception`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_training(trainer, script_args: ScriptArguments, training_args) -> dict[str, Any]:
    """Train `trainer` (as `TrainerScript.build` made it), save, card and push as the flags say; on the shapes
    world, report the held-out score before and after.

    Returns ``{"before", "after"}`` shapes metrics (shapes world only) and the trainer's ``log_history``.
    """
    shapes = script_args.model is None
    resume = check_run_outputs(trainer, resume_argument(training_args.resume_from_checkpoint))
    report: dict[str, Any] = {}
    if shapes and trainer.is_world_process_zero():
        report["before"] = shapes_report(trainer, script_args, "before")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history, for curves (benchmarks/nft_log_curves.py)
    card: dict[str, Any] = {}
    if shapes and trainer.is_world_process_zero():
        report["after"] = shapes_report(trainer, script_args, "after")
        print_before_after(report["before"], report["after"])
        Path(training_args.output_dir, "shapes_eval.json").write_text(json.dumps(report, indent=2))
        card["evaluation"] = shapes_card_table(report["before"], report["after"])
        card["sample_image"] = Path(training_args.output_dir, "samples_after.png")
        card.update(base_expr="str(SHAPES_PIPELINE_DIR)", base_import="from flow_trl.toy import SHAPES_PIPELINE_DIR")
    trainer.create_model_card(dataset_name=script_args.dataset_name, **card)
    if trainer.is_world_process_zero():
        print(f"adapter, model card (README.md) and sample grids are in {training_args.output_dir}/")
    if training_args.push_to_hub:
        trainer.push_to_hub()
    report["log_history"] = trainer.state.log_history
    return report


def parse_with_shapes_defaults(parser: FlowTrlParser, argv: list[str] | None, shapes_defaults: dict[str, Any]):
    """Parse flags/YAML; the shapes-world recipe's values are the defaults when no `--model` is given."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    shapes = not any(a == "--model" or a.startswith("--model=") for a in argv)
    return parser.parse_args_and_config(argv, defaults=shapes_defaults if shapes else {})


@dataclass(frozen=True)
class TrainerScript:
    """One `flow-trl <command>`: which trainer and config it runs, and its shapes-world recipe."""

    command: str  # e.g. "nft": `flow-trl nft`
    trainer_class: str  # a name exported by flow_trl.trainer, e.g. "FlowNFTTrainer"
    config_class: str  # e.g. "FlowNFTConfig"
    shapes_defaults: dict[str, Any]
    script_args_class: type = ScriptArguments

    def make_parser(self, prog: str | None = None) -> FlowTrlParser:
        from .. import trainer

        config = getattr(trainer, self.config_class)
        return FlowTrlParser((self.script_args_class, config), prog=prog or f"flow-trl {self.command}")

    def prepare(self, script_args: ScriptArguments, training_args) -> None:
        """Complete the arguments before the trainer is built (e.g. `flow-trl opd` resolves or trains the shapes
        world's teachers); nothing by default."""

    def build(self, script_args: ScriptArguments, training_args):
        """The trainer the command trains, ready for `run_training`: `prepare`, then the trainer on the flags' data.
        Harnesses that add callbacks (benchmarks/heldout_curve.py) build it here, so their run is the command's."""
        from .. import trainer

        check_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)  # before any work
        self.prepare(script_args, training_args)
        return build_trainer(getattr(trainer, self.trainer_class), script_args, training_args)

    def main(self, script_args: ScriptArguments, training_args) -> dict[str, Any]:
        return run_training(self.build(script_args, training_args), script_args, training_args)

    @exit_on_usage_error
    def cli(self, argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
        """Parse flags/YAML (the shapes-world recipe when no model is given) and run; a mistake in them exits with
        status 2 and one line on stderr."""
        quiet_start()
        report = self.main(*parse_with_shapes_defaults(self.make_parser(prog), argv, self.shapes_defaults))
        end_distributed()
        return report
