"""What a run leaves on disk and what misuse it refuses: warning-free LoRA files, no mix of two runs in one
output_dir, checkpoints validated before resuming, and clear errors for bad evaluation, resolution and pipeline
arguments (shapes world, CPU, seconds each)."""

import copy
import json
import warnings

import pytest
import torch
from datasets import Dataset
from helpers import MODEL, tiny_config, tiny_lora, train_prompts
from safetensors import safe_open

from flow_trl import FlowNFTConfig, FlowNFTTrainer
from flow_trl.toy import evaluate_pipeline, load_shapes_pipeline
from flow_trl.trainer.outputs import previous_run_files, validate_checkpoint_dir


CALL = dict(num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16, output_type="pt")


RUN = dict(per_device_train_batch_size=2, num_inference_steps=2, disable_tqdm=True)


def config(output_dir, **overrides):
    return tiny_config(FlowNFTConfig, output_dir, **{**RUN, **overrides})


def nft(model, output_dir, peft_config=None, **overrides):
    return FlowNFTTrainer(model, args=config(output_dir, **overrides), reward_funcs="shapes",
                          train_dataset=train_prompts(), peft_config=peft_config)


def sample(pipe):
    return pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0), **CALL).images


def assert_loads_warning_free_and_changes_output(folder):
    fresh = load_shapes_pipeline()
    base = sample(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_lora_weights(str(folder))
    assert (sample(fresh) - base).abs().max() > 1e-3


def lora_metadata(folder):
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        modules = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in f.keys()}
        return json.loads(f.metadata()["lora_adapter_metadata"]), modules


# ---- warning-free LoRA files --------------------------------------------------------------------------------------


def test_saved_lora_names_exactly_its_modules_and_loads_without_warnings(tmp_path):
    trainer = nft(MODEL, tmp_path / "out", peft_config=tiny_lora())
    with torch.no_grad():  # as if trained: B starts at 0, and a LoRA that changes nothing would prove nothing
        for name, param in trainer.transformer.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    trainer.save_model(str(tmp_path / "adapter"))
    metadata, modules = lora_metadata(tmp_path / "adapter")
    # the last block's unused add_q_proj (SD3's context_pre_only) has no weights, so the metadata must not target it
    assert sorted(metadata["transformer.target_modules"]) == sorted(modules)
    assert not metadata.get("transformer.exclude_modules")
    assert metadata["transformer.lora_alpha"] == 8
    assert_loads_warning_free_and_changes_output(tmp_path / "adapter")


def test_linear_full_fine_tune_export_loads_without_warnings(tmp_path):
    trainer = nft(MODEL, tmp_path / "out", full_finetune_params="linear", lora_export_rank=8)
    with torch.no_grad():
        for name, module in trainer.transformer.named_modules():
            if name.endswith(("attn.to_q", "attn.add_k_proj", "ff.net.2")):
                module.weight.add_(torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    trainer.save_model(str(tmp_path / "full"))
    metadata, modules = lora_metadata(tmp_path / "full")
    assert sorted(metadata["transformer.target_modules"]) == sorted(modules)
    assert_loads_warning_free_and_changes_output(tmp_path / "full")


# ---- one run per output_dir ---------------------------------------------------------------------------------------


def test_training_into_a_previous_runs_output_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"old")
    trainer = nft(MODEL, out, peft_config=tiny_lora())
    with pytest.raises(FileExistsError, match="checkpoint-2.*pytorch_lora_weights.safetensors") as error:
        trainer.train()
    for hint in ("resume_from_checkpoint", "another output_dir", "overwrite_output_dir=True"):
        assert hint in str(error.value)
    assert trainer.state.global_step == 0 and (out / "pytorch_lora_weights.safetensors").read_bytes() == b"old"


def test_overwrite_output_dir_removes_only_the_previous_runs_outputs(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-7" / "transformer").mkdir(parents=True)
    (out / "transformer").mkdir()
    (out / "transformer" / "config.json").write_text("{}")
    for name in ("training_args.bin", "trainer_state.json", "shapes_eval.json", "sample_grid.png"):
        (out / name).write_bytes(b"old")
    (out / "README.md").write_text("---\ntags:\n- flow-trl\n- nft\n---\n# old run\n")
    (out / "notes.txt").write_text("mine")
    (out / "samples_before.png").write_bytes(b"this run's before grid")
    (out / "checkpoints-of-my-own").mkdir()
    trainer = nft(MODEL, out, peft_config=tiny_lora(), overwrite_output_dir=True)
    trainer.train()
    trainer.save_model()
    left = sorted(p.name for p in out.iterdir())
    assert left == ["checkpoints-of-my-own", "notes.txt", "pytorch_lora_weights.safetensors", "samples_before.png",
                    "training_args.bin"]
    assert (out / "training_args.bin").read_bytes() != b"old"


def test_user_files_and_foreign_readmes_are_not_a_previous_run(tmp_path):
    (tmp_path / "README.md").write_text("# my project notes\n")
    (tmp_path / "samples_before.png").write_bytes(b"")
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "checkpoint-final").mkdir()  # not a Trainer checkpoint name
    assert previous_run_files(tmp_path) == []
    assert previous_run_files(tmp_path / "missing") == []
    trainer = nft(MODEL, tmp_path, peft_config=tiny_lora())
    trainer.train()  # not refused
    assert trainer.state.global_step == 1


def test_resume_into_the_same_output_dir_is_not_refused(tmp_path):
    out = tmp_path / "out"
    nft(MODEL, out, peft_config=tiny_lora(), save_strategy="steps", save_steps=1).train()
    with pytest.raises(FileExistsError, match="checkpoint-1"):
        nft(MODEL, out, peft_config=tiny_lora(), max_steps=2).train()
    resumed = nft(MODEL, out, peft_config=tiny_lora(), max_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2


def test_a_trainer_may_train_again_into_its_own_output_dir(tmp_path):
    trainer = nft(MODEL, tmp_path / "out", peft_config=tiny_lora(), save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.train()  # the same run continued by the same trainer: not another run
    assert (tmp_path / "out" / "checkpoint-1").is_dir()


@pytest.mark.parametrize("first_lora", [True, False])
def test_save_never_leaves_a_lora_next_to_a_transformer(tmp_path, first_lora):
    folder = tmp_path / "model"
    first = nft(MODEL, tmp_path / "a", peft_config=tiny_lora() if first_lora else None)
    second = nft(MODEL, tmp_path / "b", peft_config=None if first_lora else tiny_lora())
    first.save_model(str(folder))
    second.save_model(str(folder))
    assert (folder / "pytorch_lora_weights.safetensors").is_file() == (not first_lora)
    assert (folder / "transformer").exists() == first_lora


def test_save_keeps_a_transformer_folder_flow_trl_did_not_write(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    nft(MODEL, tmp_path / "out", peft_config=tiny_lora()).save_model(str(tmp_path))
    assert (tmp_path / "transformer" / "config.json").is_file()


# ---- resume checkpoints -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    trainer = nft(MODEL, out, peft_config=tiny_lora(), save_strategy="steps", save_steps=1)
    trainer.train()
    return trainer


def test_validate_checkpoint_dir_accepts_a_real_checkpoint(lora_trainer):
    out = lora_trainer.args.output_dir
    assert validate_checkpoint_dir(f"{out}/checkpoint-1", lora_trainer) == f"{out}/checkpoint-1"
    assert validate_checkpoint_dir(True, lora_trainer) == f"{out}/checkpoint-1"  # the last one in output_dir


def test_validate_checkpoint_dir_names_what_is_missing(lora_trainer, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate_checkpoint_dir(str(tmp_path / "nope"), lora_trainer)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        validate_checkpoint_dir(str(tmp_path / "file"), lora_trainer)
    with pytest.raises(FileNotFoundError, match="No checkpoint-<step> folder"):
        validate_checkpoint_dir(True, nft(MODEL, tmp_path / "fresh", peft_config=tiny_lora()))
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    with pytest.raises(FileNotFoundError, match="trainer_state.json.*pytorch_lora_weights.safetensors.*flow_trl_pol"):
        validate_checkpoint_dir(str(checkpoint), lora_trainer)
    for name in ("trainer_state.json", "pytorch_lora_weights.safetensors"):
        (checkpoint / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match="flow_trl_policies.safetensors") as error:
        validate_checkpoint_dir(str(checkpoint), lora_trainer)
    assert "trainer_state.json" not in str(error.value)


def test_validate_checkpoint_dir_wants_a_transformer_for_full_fine_tuning(lora_trainer, tmp_path):
    full = nft(MODEL, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="transformer/"):
        validate_checkpoint_dir(f"{lora_trainer.args.output_dir}/checkpoint-1", full)


# ---- bad arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -2])
def test_evaluate_pipeline_refuses_no_images_per_family(shapes_pipe, value):
    with pytest.raises(ValueError, match=f"num_per_family must be at least 1; got {value}"):
        evaluate_pipeline(shapes_pipe, num_per_family=value)


def test_evaluate_pipeline_refuses_an_empty_grid(shapes_pipe, tmp_path):
    with pytest.raises(ValueError, match="grid_per_family must be at least 1; got 0"):
        evaluate_pipeline(shapes_pipe, num_per_family=1, grid_path=tmp_path / "g.png", grid_per_family=0)


@pytest.mark.parametrize("value", [0, -64])
def test_non_positive_resolution_is_refused_by_the_config(tmp_path, value):
    with pytest.raises(ValueError, match=f"resolution must be a positive number of pixels.*got {value}"):
        config(tmp_path, resolution=value)


def test_resolution_off_the_models_grid_names_the_valid_sizes(tmp_path):
    with pytest.raises(ValueError, match="resolution 60 .* multiples of 8 .*StableDiffusion3Pipeline.* 56 or 64"):
        nft(MODEL, tmp_path, resolution=60)


def test_adapter_refuses_a_negative_image_size(shapes_pipe):
    from flow_trl.models import get_adapter

    with pytest.raises(ValueError, match="positive multiples of 8"):
        get_adapter(shapes_pipe).latent_shape(-64, -64)


@pytest.mark.parametrize("first_lora", [True, False])
def test_a_pipeline_object_cannot_serve_a_second_trainer(shapes_pipe, tmp_path, first_lora):
    pipe = copy.deepcopy(shapes_pipe)
    nft(pipe, tmp_path / "a", peft_config=tiny_lora() if first_lora else None)
    with pytest.raises(ValueError, match=r"already used by a FlowNFTTrainer.*copy\.deepcopy\(pipe\)"):
        nft(pipe, tmp_path / "b")
    nft(copy.deepcopy(shapes_pipe), tmp_path / "c", peft_config=tiny_lora())  # a fresh copy is fine


def test_a_failed_construction_leaves_the_pipeline_usable(shapes_pipe, tmp_path):
    pipe = copy.deepcopy(shapes_pipe)
    with pytest.raises(ValueError, match="prompt"):
        FlowNFTTrainer(pipe, args=config(tmp_path), reward_funcs="shapes", train_dataset=Dataset.from_dict({"x": [1]}))
    nft(pipe, tmp_path, peft_config=tiny_lora())
