"""The memory flags: text encoders, VAE and reward models offloaded between uses, prompt embeddings cached with the
text encoders released. Each gives the same training as a run without it, and leaves the modules where it says."""

import gc
import re
import weakref

import pytest
import torch
from helpers import tiny_config, tiny_lora, train_prompts
from torch import nn

from flow_trl import FlowNFTConfig, FlowNFTTrainer
from flow_trl.rewards import RewardModel
from flow_trl.toy import load_shapes_pipeline


# SGD, so that weights differ as little as gradients do (Adam's first step is about lr * sign(gradient), which turns
# float noise in a near-zero gradient into a full step)
RUN = dict(max_steps=1, learning_rate=1e-1, optim="sgd", num_inference_steps=2, guidance_scale=1.5,
           per_device_eval_batch_size=2, num_images_to_log=0)


class ColorHead(RewardModel):
    """A reward model with a torch module: a fixed linear map of the mean colour."""

    name = "color_head"

    def __init__(self):
        super().__init__(device="cpu")

    def _load(self) -> None:
        self.head = nn.Linear(3, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, -0.5, -0.5]]))
            self.head.bias.zero_()

    def _score(self, prompts, images, **columns):
        return self.head(images.mean(dim=(2, 3))).squeeze(-1)


def run(tmp_path, pipe=None, reward=None, **flags):
    """One NFT step and an evaluation; returns the trainer, its loss and eval reward, and its LoRA weights."""
    trainer = FlowNFTTrainer(
        pipe if pipe is not None else load_shapes_pipeline(),
        args=tiny_config(FlowNFTConfig, tmp_path / "out", **RUN, **flags),
        reward_funcs=reward if reward is not None else ColorHead(),
        train_dataset=train_prompts(8), eval_dataset=train_prompts(12).select(range(8, 12)), peft_config=tiny_lora(),
    )
    initial = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if "lora_" in n}
    trainer.train()
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.transformer.named_parameters() if "lora_" in n)
    eval_reward = trainer.evaluate()["eval_reward"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    lora = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if "lora_" in n}
    return trainer, losses + [eval_reward], lora


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The run without memory flags, with the moves and decodes of its VAE logged (see `record_moves_and_uses`)."""
    pipe, vae_log = load_shapes_pipeline(), []
    record_moves_and_uses(pipe.vae, vae_log, user=pipe.vae.decoder)
    _, losses, lora = run(tmp_path_factory.mktemp("baseline"), pipe)
    return losses, lora, "".join(vae_log)


def assert_same_training(result, baseline, rtol=1e-6, atol=1e-7):
    _, losses, lora = result
    assert losses == pytest.approx(baseline[0], rel=rtol, abs=atol)
    assert lora.keys() == baseline[1].keys()
    for name, value in lora.items():
        torch.testing.assert_close(value, baseline[1][name], rtol=rtol, atol=atol)


def record_moves_and_uses(module: nn.Module, log: list[str], user: nn.Module | None = None) -> None:
    """Append "T" to `log` on each `module.to(...)` and "U" on each forward of `user` (default: `module`)."""
    move = type(module).to

    def recording_to(*args, **kwargs):
        log.append("T")
        return move(module, *args, **kwargs)

    module.to = recording_to
    (user if user is not None else module).register_forward_pre_hook(lambda *_: log.append("U"))


def test_offload_flags_move_around_each_use_and_train_the_same(tmp_path, baseline):
    pipe, reward = load_shapes_pipeline(), ColorHead().load()
    logs = {"text_encoder_3": [], "vae": [], "reward": []}
    record_moves_and_uses(pipe.text_encoder_3, logs["text_encoder_3"])
    record_moves_and_uses(pipe.vae, logs["vae"], user=pipe.vae.decoder)
    record_moves_and_uses(reward.head, logs["reward"])
    result = run(tmp_path, pipe, reward, offload_text_encoders=True, offload_vae=True, offload_reward_models=True)
    assert_same_training(result, baseline)
    # placed on the CPU when the trainer is built, then brought over for each use and sent back right after it:
    # the negative prompt, the rollout and 2 eval batches are encoded; the rollout and 2 eval batches are decoded and
    # scored
    for name, expected_uses in {"text_encoder_3": 4, "vae": 3, "reward": 3}.items():
        log = "".join(logs[name])
        assert re.fullmatch(r"T(TU+T)+", log), (name, log)
        assert log.count("TU") == expected_uses, (name, log)


def test_without_offload_flags_modules_are_placed_once(baseline):
    assert re.fullmatch(r"TU{3}", baseline[2]), baseline[2]  # moved to the device once, then decodes 3 times


def test_cached_prompt_embeddings_release_the_encoders_and_train_the_same(tmp_path, baseline):
    pipe = load_shapes_pipeline()
    encoders = [weakref.ref(pipe.text_encoder), weakref.ref(pipe.text_encoder_2), weakref.ref(pipe.text_encoder_3)]
    result = run(tmp_path, pipe, cache_prompt_embeddings=True)
    # the same up to the rounding of encoding in other batches: CLIP's pooled projections move by ~1e-6 with the
    # batch composition, as they do between rollouts of other prompts
    assert_same_training(result, baseline, rtol=1e-5, atol=1e-6)
    del pipe
    gc.collect()
    assert [ref() for ref in encoders] == [None, None, None]  # freed, not only detached from the pipeline
    trainer = result[0]
    assert trainer.pipe.text_encoder is None and trainer.pipe.text_encoder_3 is None
    # 8 training prompts (5 distinct in the shapes world's first 8), 4 eval prompts, and the negative prompt ""
    assert set(trainer._prompt_cache.rows) == {"", *train_prompts(12)["prompt"]}
    with pytest.raises(ValueError, match=r"No cached embedding for 1 prompt\(s\), e\.g\. 'a blue moon'.*Add these "
                                         r"prompts to one of those datasets, or set cache_prompt_embeddings=False"):
        trainer.encode_prompts([train_prompts(1)["prompt"][0], "a blue moon"])


def test_cache_prompt_embeddings_needs_a_dataset(tmp_path):
    with pytest.raises(ValueError, match="neither was given. Pass the datasets, or set cache_prompt_embeddings=False"):
        FlowNFTTrainer(load_shapes_pipeline(), args=tiny_config(FlowNFTConfig, tmp_path, cache_prompt_embeddings=True),
                       reward_funcs=ColorHead(), peft_config=tiny_lora())


def test_cache_and_offload_of_text_encoders_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="offload_text_encoders has nothing to move. Set one of them"):
        tiny_config(FlowNFTConfig, tmp_path, cache_prompt_embeddings=True, offload_text_encoders=True)


def test_offload_reward_models_needs_a_reward_model_with_torch_modules(tmp_path, shapes_pipe):
    def brightness(prompts, images, **kwargs):
        return images.mean(dim=(1, 2, 3))

    with pytest.raises(ValueError, match=r"none of the reward functions \(brightness\) holds a torch model to move.*"
                                         r"Set offload_reward_models=False"):
        FlowNFTTrainer(shapes_pipe, args=tiny_config(FlowNFTConfig, tmp_path, offload_reward_models=True),
                       reward_funcs=brightness, train_dataset=train_prompts(8), peft_config=tiny_lora())
    assert not hasattr(shapes_pipe.transformer, "_flow_trl_trainer")  # refused before the pipeline was touched


def test_reward_model_modules_are_its_torch_attributes():
    reward = ColorHead()
    assert reward.modules() == []  # not loaded yet
    assert reward.load().modules() == [reward.head]


@pytest.mark.parametrize("variable, engine",
                         [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharding_engines_are_refused_on_cpu_processes(tmp_path, monkeypatch, variable, engine):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=rf"launched with {engine} \({variable}=true\), but this run has no "
                                         r"accelerator \(use_cpu=True\).*silently train with DDP"):
        tiny_config(FlowNFTConfig, tmp_path, use_cpu=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves modules between the CPU and a GPU")
def test_offloaded_modules_wait_on_the_cpu_between_uses(tmp_path):
    reward = ColorHead()
    reward.device = torch.device("cuda")
    trainer = FlowNFTTrainer(
        load_shapes_pipeline(), args=tiny_config(FlowNFTConfig, tmp_path, **RUN, offload_text_encoders=True,
                                                 offload_vae=True, offload_reward_models=True),
        reward_funcs=reward, train_dataset=train_prompts(8), peft_config=tiny_lora(),
    )
    trainer.train()
    assert next(trainer.transformer.parameters()).device.type == "cuda"
    for module in [trainer.pipe.vae, *trainer.adapter.text_encoders(), reward.head]:
        assert next(module.parameters()).device.type == "cpu"
