"""The flow-trl command: training and evaluation on the shapes world, config files, and bad keys."""

import json

import pytest

from flow_trl.cli import UsageError, main


TINY = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2",
        "--num_inference_steps", "3", "--eval_num_per_family", "1", "--lora_r", "4"]


@pytest.mark.parametrize("command", ["nft", "awm", "dpo", "dance_grpo"])
def test_training_commands_on_the_shapes_world_report_before_and_after(tmp_path, capsys, monkeypatch, command):
    extra = {"awm": ["--num_train_timesteps", "1"], "dpo": ["--num_train_timesteps", "1"],
             "dance_grpo": ["--sde_window_range", "0", "2"]}.get(command, [])  # the recipe's window needs 4+ steps
    assert main([command, "--output_dir", str(tmp_path), *TINY, *extra, "--logging_steps", "1"]) == 0
    report = json.loads((tmp_path / "shapes_eval.json").read_text())
    assert set(report) == {"before", "after"} and "score/position" in report["after"]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    logs = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]  # the curves' source
    assert any("reward" in log and "loss" in log for log in logs)
    assert (tmp_path / "samples_before.png").is_file() and (tmp_path / "samples_after.png").is_file()
    assert "held-out shapes score" in capsys.readouterr().out
    card = (tmp_path / "README.md").read_text()  # the model card carries the before/after figures and the grid
    assert f"{report['before']['score']:.3f} -> {report['after']['score']:.3f}" in card
    assert (tmp_path / "sample_grid.png").is_file()
    if command == "nft":  # its usage snippet runs as written (the repo id is the output folder's name)
        snippet = card.split("```python\n")[1].split("```")[0]
        monkeypatch.chdir(tmp_path.parent)
        namespace = {}
        exec(snippet, namespace)
        assert namespace["image"].size == (64, 64)


def test_yaml_config_sets_values_and_flags_override(tmp_path):
    from flow_trl.scripts.nft import make_parser

    config = tmp_path / "cfg.yaml"
    config.write_text(
        "learning_rate: 0.002\nimplicit_policy_strength: 0.1\nlora_r: 8\nenv:\n  FLOW_TRL_TEST_ENV: 'yes'\n"
    )
    script_args, args = make_parser().parse_args_and_config(
        ["--config", str(config), "--implicit_policy_strength", "0.5", "--output_dir", str(tmp_path)]
    )
    assert args.learning_rate == 0.002 and args.implicit_policy_strength == 0.5 and script_args.lora_r == 8
    import os

    assert os.environ["FLOW_TRL_TEST_ENV"] == "yes"


def test_unknown_config_keys_fail(tmp_path):
    from flow_trl.scripts.nft import make_parser

    config = tmp_path / "cfg.yaml"
    config.write_text("learning_rate: 0.002\nnft_betta: 0.1\n")
    with pytest.raises(ValueError, match=r"Unknown keys in .*cfg.yaml: \['nft_betta'\]"):
        make_parser().parse_args_and_config(["--config", str(config), "--output_dir", str(tmp_path)])
    with pytest.raises(UsageError, match="unrecognized arguments: --nft_betta 0.1"):
        make_parser().parse_args_and_config(["--nft_betta", "0.1", "--output_dir", str(tmp_path)])


def test_evaluate_command(tmp_path, capsys):
    argv = ["evaluate", "--num_per_family", "1", "--num_inference_steps", "3", "--output_dir", str(tmp_path)]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["score"] <= 1 and (tmp_path / "grid.png").is_file()
    assert "overall" in capsys.readouterr().out


def test_diagnose_command(tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", "--num_per_family", "1", "--steps", "3", "2", "--sensitivity_samples", "2",
                 "--output_dir", str(out)]) == 0
    results = json.loads((out / "diagnose.json").read_text())
    base = results["base"]
    assert base["profile"]["ratio_mean"] == pytest.approx([1.0] * 3)  # no LoRA: the model is its own reference
    assert base["score@3/plain"] == pytest.approx(base["score@3/renorm"])  # so renormalisation changes nothing
    assert len(base["sensitivity"]["mean"]) == 3 and {"score@2/plain", "quality@2/renorm"} <= set(base)
    assert (out / "norm_profile.png").is_file() and (out / "sensitivity.png").is_file()
    assert "noise-to-signal" in capsys.readouterr().out


def test_dataset_name_reads_save_to_disk_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    from flow_trl.scripts.utils import ScriptArguments, load_prompt_datasets

    rows = Dataset.from_dict({"prompt": ["a red circle", "a blue square"]})
    rows.save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "splits"))
    train, test = load_prompt_datasets(ScriptArguments(dataset_name=str(tmp_path / "single")))
    assert train["prompt"] == ["a red circle", "a blue square"] and test is None  # a saved Dataset is "train"
    splits = ScriptArguments(dataset_name=str(tmp_path / "splits"), dataset_test_split="test")
    train, test = load_prompt_datasets(splits)
    assert len(train) == 2 and test["prompt"] == ["a red circle"]
    with pytest.raises(UsageError, match=r"has no split 'dev' \(it has \['test', 'train'\]\)"):
        load_prompt_datasets(ScriptArguments(dataset_name=str(tmp_path / "splits"), dataset_train_split="dev"))


def test_none_unsets_optional_flags_list_valued_ones_included(tmp_path):
    """`flow-trl dance_grpo`'s shapes recipe sets an SDE window; `None` removes it (full-trajectory SDE), list flag
    included, and `None` among other values is a usage error."""
    from flow_trl.scripts.grpo import SCRIPT
    from flow_trl.scripts.utils import parse_with_shapes_defaults

    def parse(*flags):
        return parse_with_shapes_defaults(SCRIPT.make_parser(), [*flags, "--output_dir", str(tmp_path)],
                                          SCRIPT.shapes_defaults)[1]

    assert (parse().sde_window_size, parse().sde_window_range) == (2, [0, 3])
    args = parse("--sde_window_size", "None", "--sde_window_range", "None")
    assert args.sde_window_size is None and args.sde_window_range is None
    assert parse("--sde_window_range", "1", "3").sde_window_range == [1, 3]
    with pytest.raises(UsageError, match="--sde_window_range None unsets the flag and takes no other value"):
        parse("--sde_window_range", "None", "3")
