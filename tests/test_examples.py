"""Every example script and shapes-world config runs (1 step), every config parses, every flag has its help."""

import dataclasses
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from flow_trl.cli import TRAINING_COMMANDS, main
from flow_trl.rewards import BUILTIN_REWARDS


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples" / "scripts").glob("*.py"))
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
TINY = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2", "--steps_per_generation",
        "1", "--num_inference_steps", "2", "--eval_num_per_family", "1", "--lora_r", "4"]
# per-command flags that shrink one run further
EXTRA = {
    "nft": [],
    "awm": ["--num_train_timesteps", "1"],
    "dpo": ["--num_train_timesteps", "1"],
    "grpo": ["--sde_window_size", "1", "--sde_window_range", "0", "1"],  # the recipe's window needs 4+ steps
    "step_grpo": [],  # + the tiny DRM of the `tiny_drm` fixture
    "opd": ["--teacher_max_steps", "1", "--teacher_batch_size", "8"],  # tiny teachers, trained into output_dir
}
DRM_FLAGS = ["--max_steps", "1", "--num_samples", "4", "--min_gap", "0.01", "--num_blocks", "1",
             "--per_device_train_batch_size", "4"]


def command_of(path: Path) -> str:
    """`nft_shapes.yaml` and `nft.py` belong to `flow-trl nft`, `step_grpo.py` to `flow-trl step_grpo`."""
    return next(c for c in sorted(TRAINING_COMMANDS, key=len, reverse=True)
                if path.stem == c or path.stem.startswith(f"{c}_"))


@pytest.fixture
def few_prompts(monkeypatch):
    """The DRM recipe samples every split prompt to build its preference pairs: 8 per split here."""
    import flow_trl.toy

    rows = {split: flow_trl.toy.split_prompts(split)[:8] for split in ("train", "test")}
    monkeypatch.setattr(flow_trl.toy, "split_prompts", lambda split: rows[split])


@pytest.fixture
def tiny_drm(tmp_path, few_prompts):
    """A one-step DRM trained by `flow-trl drm`, for the StepGRPO examples."""
    out = tmp_path / "drm"
    assert main(["drm", "--output_dir", str(out), *DRM_FLAGS]) == 0
    return str(out)


def test_drm_cross_prompt_samples_add_train_pairs_only(tmp_path, few_prompts):
    reports = {}
    for cross in ("0", "3"):
        out = tmp_path / f"cross{cross}"
        assert main(["drm", "--output_dir", str(out), *DRM_FLAGS, "--cross_prompt_samples", cross]) == 0
        reports[cross] = json.loads((out / "drm_eval.json").read_text())
    # 4 own samples give at most 6 pairs per prompt, a pool of 7 up to 21; the held-out pairs are unchanged.
    assert reports["0"]["train_pairs"] <= 6 * 8 < reports["3"]["train_pairs"] <= 21 * 8
    assert reports["0"]["eval_pairs"] == reports["3"]["eval_pairs"] > 0


def tiny_flags(command: str, request) -> list[str]:
    if command == "drm":
        request.getfixturevalue("few_prompts")
        return DRM_FLAGS
    if command == "step_grpo":
        return [*TINY, "--drm_model_name_or_path", request.getfixturevalue("tiny_drm")]
    return [*TINY, *EXTRA[command]]


def test_every_example_has_a_command_and_tiny_flags():
    assert SCRIPTS and CONFIGS
    for path in SCRIPTS + CONFIGS:
        command = command_of(path)
        assert command in TRAINING_COMMANDS and (command in EXTRA or command == "drm"), path.name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_script_runs_on_the_shapes_world(script, tmp_path, monkeypatch, request):
    command = command_of(script)
    argv = [str(script), "--output_dir", str(tmp_path / "out"), *tiny_flags(command, request)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    if command == "drm":
        assert json.loads((tmp_path / "out" / "drm_eval.json").read_text())
        return
    report = json.loads((tmp_path / "out" / "shapes_eval.json").read_text())
    assert report["after"]["score"] >= 0 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("config", [c for c in CONFIGS if "shapes" in c.stem], ids=lambda p: p.name)
def test_shapes_config_is_the_recipe_and_runs_a_step(config, tmp_path, request):
    import importlib

    module = importlib.import_module(TRAINING_COMMANDS[command_of(config)])
    command = command_of(config)
    # grpo_shapes.yaml: SHAPES_GRPO_DEFAULTS (what `flow-trl dance_grpo` runs with no flags); grpo_lora_shapes.yaml:
    # SHAPES_GRPO_LORA_RECIPE
    name = config.stem.removesuffix("_shapes").upper()
    recipe = getattr(module, f"SHAPES_{name}_DEFAULTS", None) or getattr(module, f"SHAPES_{name}_RECIPE")
    values = yaml.safe_load(config.read_text())
    script_args, args = module.make_parser().parse_args_and_config(["--output_dir", str(tmp_path)], defaults=values)
    default_script_args, default_args = module.make_parser().parse_args_and_config(
        ["--output_dir", str(tmp_path)], defaults=recipe
    )
    assert script_args == default_script_args and args.to_dict() == default_args.to_dict()  # no drift from the recipe
    assert main([command, "--config", str(config), "--output_dir", str(tmp_path / "out"),
                 *tiny_flags(command, request)]) == 0
    assert (tmp_path / "out" / ("drm_eval.json" if command == "drm" else "README.md")).is_file()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_with_known_rewards(config, tmp_path):
    import importlib

    module = importlib.import_module(TRAINING_COMMANDS[command_of(config)])
    # bf16 needs a GPU: parse the GPU recipes as they would be on one, in fp32 here
    script_args, args = module.make_parser().parse_args_and_config(
        ["--config", str(config), "--output_dir", str(tmp_path), "--bf16", "false"]
    )
    assert all(name in BUILTIN_REWARDS for name in script_args.reward_funcs), script_args.reward_funcs
    if hasattr(args, "num_generations"):  # RL trainers: rollouts of whole groups
        assert args.generation_batch_size % args.num_generations == 0


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_help_lists_every_field_with_its_help(command):
    import importlib

    parser = importlib.import_module(TRAINING_COMMANDS[command]).make_parser()
    text = re.sub(r"\s+", " ", parser.format_help())
    for dtype in parser.dataclass_types:
        for f in dataclasses.fields(dtype):
            if not f.init or f.name.startswith("_"):
                continue
            assert f"--{f.name}" in text, f.name
            help_text = re.sub(r"\s+", " ", f.metadata.get("help", "")).strip()
            assert help_text, f"{dtype.__name__}.{f.name} has no help text"
            assert help_text[:40].replace("%%", "%") in text.replace("%%", "%"), f.name


def test_dpo_trains_offline_on_pairs_of_its_own_samples(tmp_path, monkeypatch):
    """`flow-trl dpo --pairs_from_samples 4`: four samples of each of 16 training prompts, best vs worst by the
    shapes reward (tied prompts give none), saved as a preference dataset, then offline DPO on it."""
    from datasets import load_from_disk

    import flow_trl.toy.world as world

    rows = {split: world.split_prompts(split)[:16] for split in ("train", "test")}
    monkeypatch.setattr(world, "split_prompts", lambda split: rows[split])

    out = tmp_path / "out"
    assert main(["dpo", "--output_dir", str(out), *TINY, *EXTRA["dpo"], "--pairs_from_samples", "4"]) == 0
    pairs = load_from_disk(str(out / "preference_pairs"))
    assert 4 <= len(pairs) <= 16 and set(pairs.column_names) >= {"prompt", "chosen", "rejected"}
    assert all(c > r for c, r in zip(pairs["chosen_reward"], pairs["rejected_reward"]))
    assert (out / "shapes_eval.json").is_file()


def test_heldout_curve_runs_the_command_it_names(tmp_path, monkeypatch):
    """benchmarks/heldout_curve.py builds the trainer as the command does (here offline DPO on pairs of its own
    samples, which sample before the trainer exists) and scores the held-out rows after the step it is told."""
    import flow_trl.toy.world as world

    rows = {split: world.split_prompts(split)[:16] for split in ("train", "test")}
    monkeypatch.setattr(world, "split_prompts", lambda split: rows[split])
    out = tmp_path / "curve"
    script = Path(__file__).parents[1] / "benchmarks" / "heldout_curve.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--trainer", "dpo", "--every", "1", "--output_dir", str(out), "--",
                                      *TINY, *EXTRA["dpo"], "--pairs_from_samples", "4"])
    runpy.run_path(str(script), run_name="__main__")
    curve = json.loads((out / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [1]
    assert curve["points"][0]["score"] == pytest.approx(curve["after"]["score"])  # the same policy, the same rows
    assert (out / "preference_pairs").is_dir() and (out / "heldout_curve.png").is_file()
