"""Publishing: the folder `push_to_hub` uploads (adapter, model card, sample grid), checked at the Hub API boundary."""

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig

from flow_trl import FlowNFTConfig, FlowNFTTrainer
from flow_trl.hub import card_hyperparameters, is_hub_id, render_model_card
from flow_trl.toy import load_shapes_pipeline, shapes_dataset


SECRET = "hf_not_a_real_token_0123456789"


class FakeHub:
    """Stands in for the Hub: records `create_repo` and copies what `upload_folder` would upload."""

    def __init__(self, root: Path):
        self.root, self.repos, self.uploads = root, [], []

    def create_repo(self, api, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append((repo_id, token))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, api, repo_id, folder_path, ignore_patterns=None, token=None, **kwargs):
        target = self.root / repo_id
        for path in Path(folder_path).rglob("*"):
            rel = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or []):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / rel)
        self.uploads.append((repo_id, token))
        return f"https://huggingface.co/{repo_id}"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(api, **kw))
    return hub


def test_push_to_hub_uploads_a_loadable_adapter_and_a_model_card(tmp_path, fake_hub):
    pipe = load_shapes_pipeline()
    pipe.register_to_config(_name_or_path="my-org/shapes-sd3")  # as if loaded from the Hub
    args = FlowNFTConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=2, num_inference_steps=4,
        max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", guidance_scale=1.0,
        per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2, push_to_hub=True,
        hub_model_id="me/shapes-nft", hub_token=SECRET,
    )
    trainer = FlowNFTTrainer(
        pipe, args=args, reward_funcs="shapes", train_dataset=shapes_dataset("train").select(range(8)),
        eval_dataset=shapes_dataset("test").select(range(4)),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.push_to_hub()

    assert fake_hub.repos[0] == ("me/shapes-nft", SECRET) and fake_hub.uploads == [("me/shapes-nft", SECRET)]
    repo = fake_hub.root / "me/shapes-nft"
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert {"pytorch_lora_weights.safetensors", "README.md", "sample_grid.png", "training_args.bin"} <= files
    for name in files:  # the token reaches the API, never a file
        assert SECRET.encode() not in (repo / name).read_bytes(), name

    card = ModelCard.load(repo / "README.md")
    assert card.data.base_model == "my-org/shapes-sd3"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"flow-trl", "nft", "lora"} <= set(card.data.tags)
    assert 'pipe.load_lora_weights("me/shapes-nft")' in card.text
    assert "StableDiffusion3Pipeline.from_pretrained(\"my-org/shapes-sd3\"" in card.text
    assert "DiffusionNFT" in card.text and "@inproceedings" in card.text  # algorithm and citation
    assert "| `shapes` | 1.0 |" in card.text and "`implicit_policy_strength`" in card.text
    assert f"{metrics['eval_reward']:.4f}".rstrip("0") in card.text  # the final evaluation figures
    assert "![Samples](sample_grid.png)" in card.text

    # the uploaded folder is a LoRA diffusers loads, reproducing the trained policy's samples
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, max_sequence_length=16, output_type="pt")
    expected = trainer.pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    fresh = StableDiffusion3Pipeline.from_pretrained(str(Path(load_shapes_pipeline().config._name_or_path)))
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(repo))
    loaded = fresh("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)


def test_model_card_of_a_full_fine_tune_without_a_hub_base_model():
    card = render_model_card(
        model_name="run", repo_id="me/run", algorithm="AWM", trainer_class="FlowAWMTrainer",
        pipeline_class="StableDiffusion3Pipeline", is_lora=False, rewards=[("pickscore", 1.0), ("hpsv2", 0.5)],
        hyperparameters={"learning_rate": 3e-4, "hub_token": SECRET, "num_inference_steps": 14},
    )
    parsed = ModelCard(str(card))
    assert parsed.data.base_model is None and "lora" not in parsed.data.tags and "awm" in parsed.data.tags
    assert 'subfolder="transformer"' in parsed.text and "load_lora_weights" not in parsed.text
    assert "| `hpsv2` | 0.5 |" in parsed.text and SECRET not in str(card)
    assert "No evaluation was run" in parsed.text


def test_card_hyperparameters_and_hub_ids(tmp_path):
    args = FlowNFTConfig(output_dir=str(tmp_path), hub_token=SECRET, report_to="none")
    params = card_hyperparameters(args)
    assert params["implicit_policy_strength"] == args.implicit_policy_strength
    assert params["learning_rate"] == args.learning_rate
    assert not any(k.endswith("_token") for k in params) and "output_dir" not in params
    assert is_hub_id("stabilityai/stable-diffusion-3.5-medium") and is_hub_id("gpt2")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./local/model") and not is_hub_id("a/b/c")


def test_model_card_loads_a_local_base_from_what_the_caller_says(tmp_path):
    from PIL import Image

    from flow_trl.images import save_image_grid

    grid = tmp_path / "grid.png"
    save_image_grid(torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)), grid, ncols=3, scale=1)
    assert Image.open(grid).size == (3 * (8 + 2), 2 * (8 + 2))  # 3 x 2 cells with 2-pixel gutters
    args = FlowNFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, num_generations=2,
                         report_to="none")
    trainer = FlowNFTTrainer(load_shapes_pipeline(), args=args, reward_funcs="shapes",
                             train_dataset=shapes_dataset("train").select(range(2)))
    readme = tmp_path / "run" / "README.md"
    trainer.create_model_card(sample_image=grid)  # a local base the card knows nothing about: a placeholder
    assert 'from_pretrained("<base model id or path>"' in readme.read_text()
    assert "SHAPES_PIPELINE_DIR" not in readme.read_text()
    trainer.create_model_card(base_expr="str(MY_DIR)", base_import="from my_package import MY_DIR")
    trainer.create_model_card()  # remembered, as `evaluation` is, for push_to_hub's call
    text = readme.read_text()
    assert "from my_package import MY_DIR\n" in text and "from_pretrained(str(MY_DIR)" in text
    assert (tmp_path / "run" / "sample_grid.png").read_bytes() == grid.read_bytes()
