"""The command line: a quiet, fast start, short grouped help, `--version`/`env`, and one-line user errors."""

import dataclasses
import json
import subprocess
import sys

import pytest

from flow_trl.cli import UsageError, main


TINY = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2", "--steps_per_generation",
        "1", "--num_inference_steps", "2", "--eval_num_per_family", "1", "--lora_r", "4"]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flow_trl.cli", *argv], capture_output=True, text=True, timeout=300)


def test_top_level_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom flow_trl.cli import main\nfor argv in (['--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "nft" in out and "env" in out and "flow-trl 0.1" in out
    assert out.strip().endswith("False")


def test_env_lists_versions_and_device(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("flow_trl", "torch", "diffusers", "transformers", "peft", "accelerate", "trl"):
        assert f"- {name} version: " in out
    assert "- Device: cpu" in out or "- Device: cuda" in out or "- Device: mps" in out


def test_training_help_is_short_names_the_command_and_points_to_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nft", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "usage: flow-trl nft [--config FILE.yaml] [--FLAG VALUE ...]"
    assert len(lines) < 120
    for flag in ("--config", "--model", "--reward_funcs", "--output_dir", "--max_steps", "--learning_rate", "--lora_r",
                 "--num_generations", "--per_device_train_batch_size", "--help-all"):
        assert flag in text, flag
    assert "--adam_beta1" not in text and "flow-trl nft --help-all" in text


@pytest.mark.parametrize("command", ["nft", "drm", "opd"])
def test_help_all_lists_every_flag(command, capsys):
    import importlib

    from flow_trl.cli import TRAINING_COMMANDS

    with pytest.raises(SystemExit):
        main([command, "--help-all"])
    text = capsys.readouterr().out
    assert text.startswith(f"usage: flow-trl {command} ")
    parser = importlib.import_module(TRAINING_COMMANDS[command]).make_parser()
    for dtype in parser.dataclass_types:
        for f in dataclasses.fields(dtype):
            if f.init and not f.name.startswith("_"):
                assert f"--{f.name}" in text, f.name
    assert "--config FILE.yaml" in text


def test_config_with_equals_sign_and_at_the_end(tmp_path):
    from flow_trl.scripts.nft import make_parser

    config = tmp_path / "cfg.yaml"
    config.write_text("learning_rate: 1e-4\nreward_funcs: shapes\nmax_steps: 7\n")
    for argv in (["--config=" + str(config)], ["--output_dir", str(tmp_path), "--config", str(config)]):
        script_args, args = make_parser().parse_args_and_config([*argv, "--max_steps", "3"])
        assert args.learning_rate == 1e-4 and args.max_steps == 3 and script_args.reward_funcs == ["shapes"]


def test_parser_is_trls_and_none_unsets_an_optional_flag(tmp_path):
    from trl import TrlParser

    from flow_trl.scripts.nft import SHAPES_NFT_DEFAULTS, make_parser
    from flow_trl.scripts.utils import parse_with_shapes_defaults

    parser = make_parser()
    assert isinstance(parser, TrlParser)
    assert SHAPES_NFT_DEFAULTS["lora_export_rank"] == 128  # the recipe sets it; `none` must be able to unset it
    _, args = parse_with_shapes_defaults(parser, ["--lora_export_rank", "none"], SHAPES_NFT_DEFAULTS)
    assert args.lora_export_rank is None
    config = write(tmp_path, "lora_export_rank: None\nmax_steps: 3\n")
    _, args = parse_with_shapes_defaults(make_parser(), ["--config", config], SHAPES_NFT_DEFAULTS)
    assert args.lora_export_rank is None and args.max_steps == 3


def test_cpu_runs_do_not_pin_memory_unless_asked(tmp_path):
    import torch

    from flow_trl.scripts.nft import make_parser
    from flow_trl.scripts.utils import parse_with_shapes_defaults

    _, args = parse_with_shapes_defaults(make_parser(), ["--output_dir", str(tmp_path)], {})
    assert args.dataloader_pin_memory is torch.accelerator.is_available()
    _, args = parse_with_shapes_defaults(make_parser(), ["--dataloader_pin_memory", "true"], {})
    assert args.dataloader_pin_memory is True
    from flow_trl import FlowNFTConfig
    from flow_trl.trainer.drm_config import DRMConfig

    for config_class in (FlowNFTConfig, DRMConfig):  # library users get the same default
        assert config_class(output_dir=str(tmp_path)).dataloader_pin_memory is torch.accelerator.is_available()


def write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def previous_run(tmp_path) -> str:
    out = tmp_path / "previous"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    return str(out)


def resume_dir_without_state(tmp_path) -> str:
    (tmp_path / "ckpt" / "checkpoint-5").mkdir(parents=True)
    return str(tmp_path / "ckpt")


# (argv builder, what the one-line message says)
USER_ERRORS = {
    "yaml_syntax": (lambda t: ["nft", "--config", write(t, "learning_rate: [1,\n")], "is not valid YAML, line"),
    "yaml_unknown_key": (lambda t: ["nft", "--config", write(t, "nft_betta: 1\n")], "Unknown keys in"),
    "yaml_list_for_scalar": (lambda t: ["nft", "--config", write(t, "learning_rate: [1, 2]\n")],
                             "`learning_rate` takes one value, got the list [1, 2]"),
    "yaml_wrong_type": (lambda t: ["nft", "--config", write(t, "max_steps: many\n")],
                        "`max_steps: 'many'` is not a valid int"),
    "yaml_bad_choice": (lambda t: ["nft", "--config", write(t, "eval_strategy: sometimes\n")], "is not one of"),
    "yaml_not_a_mapping": (lambda t: ["nft", "--config", write(t, "- a\n- b\n")], "must contain a YAML mapping"),
    "yaml_missing_file": (lambda t: ["nft", "--config", str(t / "nope.yaml")], "No such file or directory"),
    "config_without_value": (lambda t: ["nft", "--config"], "argument --config: expected one argument"),
    "unknown_flag": (lambda t: ["nft", "--nft_betta", "1"], "unrecognized arguments: --nft_betta 1"),
    "bad_flag_value": (lambda t: ["nft", "--learning_rate", "abc"], "invalid float value: 'abc'"),
    "config_validation": (lambda t: ["drm", "--loss_type", "hinge", "--output_dir", str(t)], "loss_type must be"),
    "resume_missing": (lambda t: ["nft", "--resume_from_checkpoint", str(t / "nope"), "--output_dir", str(t / "o")],
                       "no such directory"),
    "resume_not_a_checkpoint": (lambda t: ["nft", "--resume_from_checkpoint", resume_dir_without_state(t)],
                                "is not a checkpoint (no trainer_state.json); it has ['checkpoint-5']"),
    "resume_true_without_checkpoints": (lambda t: ["nft", "--resume_from_checkpoint", "true", "--output_dir", str(t)],
                                        "no checkpoint-<step> folder in"),
    "output_dir_of_previous_run": (lambda t: ["nft", *TINY, "--output_dir", previous_run(t)],
                                   "already holds the outputs of another run"),
    "opd_missing_teachers": (lambda t: ["opd", "--output_dir", str(t), "--train_teachers", "false"],
                             "No shapes-world teacher 'objects'"),
    "evaluate_zero_per_family": (lambda t: ["evaluate", "--num_per_family", "0"],
                                 "--num_per_family must be at least 1"),
    "evaluate_missing_lora": (lambda t: ["evaluate", "--lora", str(t / "nope")], "no such file or directory"),
    "evaluate_missing_model": (lambda t: ["evaluate", "--model", str(t)], "no model_index.json"),
    "diagnose_missing_lora": (lambda t: ["diagnose", "--lora", str(t / "nope")], "no such file or directory"),
    "drm_one_sample": (lambda t: ["drm", "--num_samples", "1", "--output_dir", str(t)],
                       "--num_samples must be at least 2"),
    "drm_zero_prompts": (lambda t: ["drm", "--max_prompts", "0", "--output_dir", str(t)],
                         "--max_prompts must be at least 1"),
    "model_without_dataset": (lambda t: ["nft", "--model", str(t), "--output_dir", str(t)], "needs prompts"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands that run far enough must not write into the checkout
    build, message = USER_ERRORS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(build(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "it/s]" not in line]  # a progress bar of work done before the check, if any
    assert len(err) == 1 and err[0].startswith("flow-trl: error: "), err
    assert message in err[0]
    assert not list(tmp_path.glob("**/samples_before.png"))  # found before the baseline evaluation


def test_user_error_from_the_console_has_no_traceback(tmp_path):
    result = run_cli("nft", "--config", write(tmp_path, "learning_rate: [1,\n"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("flow-trl: error: --config") and len(result.stderr.splitlines()) == 1


def test_config_errors_raise_usage_error_in_python(tmp_path):
    from flow_trl.scripts.nft import make_parser

    with pytest.raises(UsageError, match="takes one value"):
        make_parser().parse_args_and_config(["--config", write(tmp_path, "max_steps: [1, 2]\n")])


def test_start_prints_no_warnings_or_loading_bars(tmp_path):
    result = run_cli("nft", *TINY, "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    for noise in ("torchvision", "pin_memory", "Loading pipeline components", "Loading weights", "Warning"):
        assert noise not in result.stderr, noise
    assert "1/1" in result.stderr  # the training progress bar stays


def test_spread_keeps_every_family():
    from flow_trl.scripts.drm import spread
    from flow_trl.toy import split_prompts

    rows = split_prompts("train")
    picked = spread(rows, 12)
    assert len(picked) == 12 and {r["tag"] for r in picked} == {r["tag"] for r in rows}  # 6 families, 2 each
    assert len({r["prompt"] for r in picked}) == 12
    assert spread(rows, None) == rows and spread(rows, 10**6) == rows


def test_drm_limits_prompts_shows_progress_and_writes_a_model_card(tmp_path, capsys):
    out = tmp_path / "drm"
    assert main(["drm", "--output_dir", str(out), "--max_steps", "1", "--num_samples", "3", "--min_gap", "0.01",
                 "--num_blocks", "1", "--per_device_train_batch_size", "4", "--max_prompts", "6"]) == 0
    report = json.loads((out / "drm_eval.json").read_text())
    assert 0 < report["train_pairs"] <= 3 * 6 and 0 < report["eval_pairs"] <= 3 * 6  # 3 samples: <= 3 pairs a prompt
    err = capsys.readouterr().err
    assert "sampling train pairs" in err and "18/18" in err  # 6 prompts x 3 samples scored
    card = (out / "README.md").read_text()
    assert "diffusion-based reward model" in card and "first 1 transformer blocks" in card
    assert f"{report['train_pairs']} training pairs" in card and "labelled by shapes" in card
    assert f"| eval_accuracy | {report['eval_accuracy']:.3f} |" in card
    assert "DiffusionRewardModel.from_pretrained" in card
